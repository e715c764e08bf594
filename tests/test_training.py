import pytest
import tiny_models as tm
import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

from ran_peft import (
    DualEncoderFamily,
    GenerativeFamily,
    ImageClassifierFamily,
    PixelBox,
    RANConfig,
    RANTrainingWrapper,
    UnsupportedModelError,
    detect_family,
    ran_loss,
)
from ran_peft.kernels.rectify import rectification_kl_reference

BOX = PixelBox(tm.MEAN, tm.STD)
FULL_RECIPE = dict(
    kl_weight=1.0, consistency_weight=0.5, covariance_weight=0.1, spectrum_weight=0.1, spectrum_top_k=1
)


def _peft(case, **recipe):
    config = RANConfig(
        r=4, target_modules=case.target_modules, modules_to_save=case.modules_to_save, **recipe
    )
    return get_peft_model(case.model, config), config


@pytest.mark.parametrize(
    "name, family",
    [
        ("vit", ImageClassifierFamily),
        ("convnext", ImageClassifierFamily),
        ("clip", DualEncoderFamily),
        ("siglip", DualEncoderFamily),
        ("llava", GenerativeFamily),
    ],
)
def test_families_are_recognised_from_the_model(name, family):
    case = tm.ALL_CASES[name]()
    assert isinstance(detect_family(case.model), family)
    model, _ = _peft(case)
    assert isinstance(detect_family(model), family)


@pytest.mark.parametrize("name", sorted(tm.ALL_CASES))
@pytest.mark.parametrize("free_start", [True, False])
def test_full_recipe_trains_every_architecture(name, free_start):
    case = tm.ALL_CASES[name]()
    model, config = _peft(case, attack_steps=2, free_start=free_start, **FULL_RECIPE)
    model.train()
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)
    assert sum(float(p.grad.abs().sum()) for p in lora_b) > 0
    assert {"clean", "adversarial", "kl", "consistency", "covariance", "spectrum"} <= set(output.parts)
    assert output.parts["kl"] >= 0
    delta = BOX.to_pixels(output.adversarial_pixel_values) - BOX.to_pixels(case.batch["pixel_values"])
    assert 0 < delta.abs().max().item() <= config.epsilon + 1e-5


def test_free_start_gives_exactly_the_gradient_of_the_written_loss():
    """The surrogate that carries the clean pass's parameter gradients must equal a plain backward."""
    case = tm.convnext()  # no dropout: two passes over the same pixels give the same graph
    model, config = _peft(case, adversarial_weight=0.3, kl_weight=0.0, free_start=True)
    model.train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    output.loss.backward()
    ran_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    family = detect_family(model)
    clean = family.run(model, case.batch, case.batch["pixel_values"]).loss
    adversarial = family.run(model, case.batch, output.adversarial_pixel_values).loss
    reference = 0.7 * clean + 0.3 * adversarial
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    reference.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(ran_grads[name], parameter.grad, rtol=1e-4, atol=1e-6)


# mix 0.3: the KL's rows join the task loss's dense gradient (sent back sparse); mix 0: the KL's gradient alone.
@pytest.mark.parametrize("mix", [0.3, 0.0])
def test_generative_kl_on_answer_rows_gives_the_gradient_of_the_written_loss(mix):
    """RAN keeps only the answer rows of a generative VLM's logits for the KL: the loss and its gradient must be
    those of the recipe's loss with the KL over the whole masked [B, T, V] logits."""
    case = tm.llava()  # no dropout: two passes over the same pixels give the same graph
    model, config = _peft(case, adversarial_weight=mix, kl_weight=2.0, free_start=True)
    model.train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    assert output.logits is None  # the [B, T, V] logits are not kept past the clean pass
    output.loss.backward()
    ran_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    family = detect_family(model)
    clean = family.run(model, case.batch, case.batch["pixel_values"])
    adversarial = family.run(model, case.batch, output.adversarial_pixel_values)
    assert 0 < int(clean.logits_mask.sum()) < clean.logits_mask.numel()
    kl = rectification_kl_reference(clean.logits.detach(), adversarial.logits, adversarial.logits_mask)
    reference = (1 - mix) * clean.loss + mix * adversarial.loss + 2.0 * kl
    assert output.parts["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    reference.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(ran_grads[name], parameter.grad, rtol=1e-4, atol=1e-6)


def test_warmup_ramps_the_budget():
    case = tm.vit()
    model, config = _peft(case, noise_warmup_steps=4, epsilon=8 / 255)
    model.train()
    first = ran_loss(model, case.batch, config, pixel_box=BOX, step=0)
    last = ran_loss(model, case.batch, config, pixel_box=BOX, step=10)
    assert first.parts["epsilon"].item() == pytest.approx(2 / 255)
    assert last.parts["epsilon"].item() == pytest.approx(8 / 255)
    delta = BOX.to_pixels(first.adversarial_pixel_values) - BOX.to_pixels(case.batch["pixel_values"])
    assert delta.abs().max().item() <= 2 / 255 + 1e-5


@pytest.mark.parametrize("name", ["clip", "llava"])
def test_joint_text_embedding_attack(name):
    case = tm.ALL_CASES[name]()
    model, config = _peft(case, text_epsilon=0.05, attack_steps=2, free_start=False)
    model.train()
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert output.parts["adversarial"] > output.parts["clean"] - 1e-3


def test_dual_encoder_prompt_classification():
    case = tm.clip(prompts=True)
    model, config = _peft(case, kl_weight=1.0)
    model.train()
    output = ran_loss(model, case.batch, config, pixel_box=BOX, class_text_inputs=case.class_text_inputs)
    assert output.logits.shape == (4, 3)
    output.loss.backward()
    with pytest.raises(ValueError, match="class prompts"):
        ran_loss(model, case.batch, config, pixel_box=BOX)


def test_wrapper_only_acts_in_training_and_restores_the_forward():
    case = tm.vit()
    model, config = _peft(case)
    plain_forward = model.forward
    wrapper = RANTrainingWrapper(model, config, BOX)
    model.train()
    assert "kl" in model(**case.batch).parts
    model.eval()
    with torch.no_grad():
        wrapped_eval = model(**case.batch)
    assert not hasattr(wrapped_eval, "parts") or wrapped_eval.get("parts") is None
    with pytest.raises(RuntimeError, match="already wrapped"):
        RANTrainingWrapper(model, config, BOX)
    wrapper.remove()
    assert "forward" not in model.__dict__ and model.forward == plain_forward
    assert wrapper.pop_logged_parts()["ran/kl"] >= 0


def test_logged_parts_are_means_over_the_steps_that_have_them():
    """With `attack_every=2` the clean steps have no adversarial part: its logged mean is over the attacked steps."""
    case = tm.vit()
    model, config = _peft(case, attack_every=2)
    wrapper = RANTrainingWrapper(model, config, BOX)
    model.train()
    parts = []
    for step in range(2):
        wrapper.step = step
        output = model(**case.batch)
        output.loss.backward()
        parts.append(output.parts)
    logged = wrapper.pop_logged_parts()
    assert "adversarial" in parts[0] and "adversarial" not in parts[1]
    assert logged["ran/adversarial"] == pytest.approx(parts[0]["adversarial"].item())
    assert logged["ran/epsilon"] == pytest.approx(config.epsilon)
    assert logged["ran/clean"] == pytest.approx((parts[0]["clean"] + parts[1]["clean"]).item() / 2)
    assert wrapper.pop_logged_parts() == {}


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"labels": torch.tensor([0])}, "pixel_values"),
        (
            {"pixel_values": torch.zeros(0, 3, 16, 16), "labels": torch.zeros(0, dtype=torch.long)},
            "empty batch",
        ),
        ({"pixel_values": torch.full((1, 3, 16, 16), float("nan")), "labels": torch.tensor([0])}, "NaN"),
        ({"pixel_values": torch.zeros(1, 3, 16, 16)}, "needs `labels`"),
    ],
)
def test_bad_batches_get_clear_errors(inputs, message):
    case = tm.vit()
    model, config = _peft(case)
    with pytest.raises(ValueError, match=message):
        ran_loss(model.train(), inputs, config, pixel_box=BOX)


def test_models_that_cannot_be_attacked_get_an_error_saying_what_is_needed():
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="no `pixel_values`"):
        detect_family(bert)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        )
    )
    with pytest.raises(UnsupportedModelError, match="no training loss"):
        detect_family(vision)


def test_missing_normalisation_is_a_clear_error():
    case = tm.vit()
    model, config = _peft(case)
    with pytest.raises(ValueError, match="image_mean"):
        ran_loss(model.train(), case.batch, config)
    config.image_mean, config.image_std = list(tm.MEAN), list(tm.STD)
    assert torch.isfinite(ran_loss(model.train(), case.batch, config).loss)


def test_logits_with_an_image_prefix_are_read_at_the_text_positions():
    """GIT puts its image features in front of the text itself: its logits are longer than its labels by them."""
    from types import SimpleNamespace

    from ran_peft.families import GenerativeFamily

    labels = torch.tensor([[-100, 5, 6, -100]])
    logits = torch.randn(1, 3 + 4, 10)  # three image positions, then the four text positions

    def forward(**inputs):
        return SimpleNamespace(loss=torch.zeros(()), logits=logits)

    output = GenerativeFamily().run(forward, {"labels": labels}, torch.zeros(1, 3, 4, 4))
    assert output.logits_mask.tolist() == [[False, False, False, True, True, False, False]]


def test_a_model_that_takes_its_images_under_another_name_is_refused_with_that_name():
    from ran_peft import UnsupportedModelError

    class TakesOtherPixels(torch.nn.Module):
        def forward(self, input_ids=None, pixel_values_images=None, labels=None):
            return None

    with pytest.raises(
        UnsupportedModelError, match=r"takes its images as `pixel_values_images`, not as `pixel_values`"
    ):
        detect_family(TakesOtherPixels())
