"""The light-weight recipes: each one's loss and gradient against a plain reference written from its definition.

- `attack_every`: off-steps are plain clean steps;
- `adversarial_fraction`: the attack and the adversarial terms on the smallest-margin samples only;
- `carry_perturbations`: a sample's next attack starts from its last perturbation;
- `free_replay`: one forward/backward per call, each replay perturbed by the previous backward's input gradient;
- `adversarial_pass='image_features'`: the attack and the consistency term through the vision tower alone.
"""

import math

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from peft import get_peft_model

from ran_peft import PixelBox, RANConfig, detect_family, ran_loss
from ran_peft.families import vision_tower_features
from ran_peft.kernels.rectify import rectification_kl_reference
from ran_peft.recipe_memory import RecipeMemory

BOX = PixelBox(tm.MEAN, tm.STD)


def _peft(case, **recipe):
    recipe = {"target_modules": case.target_modules, "modules_to_save": case.modules_to_save, **recipe}
    config = RANConfig(r=4, **recipe)
    model = get_peft_model(case.model, config)
    with torch.no_grad():  # LoRA B starts at 0: give it values so every LoRA weight gets a gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.train()
    return model, config


def _gradients(model) -> dict[str, torch.Tensor]:
    gradients = {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }
    model.zero_grad()
    return gradients


def _assert_same_gradients(ours, reference):
    assert ours.keys() == reference.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def _in_pixels(pixel_values):
    return BOX.to_pixels(pixel_values)


def test_attack_every_k_steps_makes_the_other_steps_plain_clean_steps():
    case = tm.convnext()
    model, config = _peft(case, attack_every=3)
    family = detect_family(model)
    for step in range(4):
        output = ran_loss(model, case.batch, config, pixel_box=BOX, step=step)
        output.loss.backward()
        ours = _gradients(model)
        if step % 3 == 0:
            assert "adversarial" in output.parts and "kl" in output.parts
            continue
        assert set(output.parts) == {"clean"}
        assert torch.equal(output.adversarial_pixel_values, case.batch["pixel_values"])
        reference = family.run(model, case.batch, case.batch["pixel_values"]).loss
        assert output.loss.item() == pytest.approx(reference.item(), rel=1e-6)
        reference.backward()
        _assert_same_gradients(ours, _gradients(model))


def test_adversarial_fraction_attacks_the_smallest_margin_samples_with_the_written_loss():
    case = tm.convnext(batch=8)
    model, config = _peft(case, adversarial_fraction=0.3, adversarial_weight=0.4, kl_weight=2.0)
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    output.loss.backward()
    ours = _gradients(model)

    family = detect_family(model)
    pixel_values, labels = case.batch["pixel_values"], case.batch["labels"]
    with torch.no_grad():
        logits = family.run(model, case.batch, pixel_values).logits
    margins = [
        (logits[i, labels[i]] - torch.cat([logits[i, : labels[i]], logits[i, labels[i] + 1 :]]).max()).item()
        for i in range(8)
    ]
    chosen = sorted(sorted(range(8), key=lambda i: margins[i])[: math.ceil(0.3 * 8)])
    assert output.parts["attacked_share"].item() == pytest.approx(3 / 8)
    moved = (_in_pixels(output.adversarial_pixel_values) - _in_pixels(pixel_values)).flatten(1).abs().amax(1)
    assert sorted(torch.nonzero(moved > 0).flatten().tolist()) == chosen  # the others keep their clean pixels
    assert moved.max().item() <= config.epsilon + 1e-6

    clean = family.run(model, case.batch, pixel_values)
    subset = {"pixel_values": output.adversarial_pixel_values[chosen], "labels": labels[chosen]}
    adversarial = family.run(model, subset, subset["pixel_values"])
    kl = rectification_kl_reference(clean.logits[chosen].detach(), adversarial.logits)
    reference = 0.6 * clean.loss + 0.4 * F.cross_entropy(adversarial.logits, labels[chosen]) + 2.0 * kl
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    reference.backward()
    _assert_same_gradients(ours, _gradients(model))


def test_adversarial_fraction_refuses_a_model_without_per_sample_class_logits():
    case = tm.llava()
    model, config = _peft(case, adversarial_fraction=0.5)
    with pytest.raises(ValueError, match=r"adversarial_fraction=0.5 ranks samples by their clean margin"):
        ran_loss(model, case.batch, config, pixel_box=BOX)


def test_carried_perturbations_start_the_next_attack_where_the_last_one_ended():
    case = tm.convnext()
    # A zero step leaves each attack at its start: what comes back the second time is exactly what was carried.
    model, config = _peft(case, carry_perturbations=True, step_size=0.0, free_start=False)
    memory = RecipeMemory()
    first = ran_loss(model, case.batch, config, pixel_box=BOX, memory=memory).adversarial_pixel_values
    assert len(memory.perturbations) == 4
    order = torch.tensor([2, 0, 3, 1])  # the same samples in another order are recognised by their pixels
    shuffled = {key: value[order] for key, value in case.batch.items()}
    second = ran_loss(model, shuffled, config, pixel_box=BOX, memory=memory).adversarial_pixel_values
    carried = first[order] - case.batch["pixel_values"][order]
    torch.testing.assert_close(
        second - shuffled["pixel_values"], carried, atol=2e-4, rtol=0
    )  # half precision
    fresh = ran_loss(model, shuffled, config, pixel_box=BOX, memory=RecipeMemory()).adversarial_pixel_values
    assert not torch.allclose(fresh, second, atol=1e-3)  # without the memory: a new random start
    with pytest.raises(ValueError, match="memory=RecipeMemory"):
        ran_loss(model, case.batch, config, pixel_box=BOX)


def test_free_replay_trains_each_replay_on_the_previous_backwards_input_gradient():
    case, other = tm.convnext(seed=0), tm.convnext(seed=1)
    model, config = _peft(case, free_replay=3, kl_weight=1.5)
    family = detect_family(model)
    memory = RecipeMemory()
    pixel_values = case.batch["pixel_values"]

    clean_output = ran_loss(model, case.batch, config, pixel_box=BOX, memory=memory)
    clean_output.loss.backward()
    ours = _gradients(model)
    variable = pixel_values.clone().requires_grad_(True)
    clean = family.run(model, case.batch, variable)
    assert clean_output.loss.item() == pytest.approx(clean.loss.item(), rel=1e-6)
    clean.loss.backward()
    _assert_same_gradients(ours, _gradients(model))
    input_gradient = variable.grad

    # The next call's batch is not used: the replay perturbs the cached one by the clean backward's gradient.
    replay_output = ran_loss(model, other.batch, config, pixel_box=BOX, memory=memory)
    replay_output.loss.backward()
    ours = _gradients(model)
    step = 1.25 * config.epsilon  # the one-step rule, in pixel units
    expected = torch.clamp(_in_pixels(pixel_values) + step * torch.sign(input_gradient), 0, 1)
    expected = torch.min(
        torch.max(expected, _in_pixels(pixel_values) - config.epsilon),
        _in_pixels(pixel_values) + config.epsilon,
    )
    torch.testing.assert_close(
        _in_pixels(replay_output.adversarial_pixel_values), expected, atol=1e-5, rtol=0
    )
    adversarial = family.run(model, case.batch, replay_output.adversarial_pixel_values)
    kl = rectification_kl_reference(clean.logits.detach(), adversarial.logits)
    reference = adversarial.loss + 1.5 * kl
    assert replay_output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    reference.backward()
    _assert_same_gradients(ours, _gradients(model))

    ran_loss(model, other.batch, config, pixel_box=BOX, memory=memory).loss.backward()  # the third replay
    fourth = ran_loss(model, other.batch, config, pixel_box=BOX, memory=memory)  # a new batch's clean replay
    assert torch.equal(fourth.adversarial_pixel_values, other.batch["pixel_values"])


def test_free_replay_on_a_generative_vlm_gives_the_written_loss_and_gradient():
    """The adversarial replay of a generative VLM: its answer-token loss plus the KL over the answer rows to the clean
    replay's cached rows (whose gradient joins the task loss's in place, as in the default's adversarial pass)."""
    case = tm.llava()
    model, config = _peft(
        case, free_replay=2, kl_weight=2.0, target_modules=r".*(q_proj|v_proj|linear_1|linear_2)"
    )
    family = detect_family(model)
    memory = RecipeMemory()
    clean_output = ran_loss(model, case.batch, config, pixel_box=BOX, memory=memory)
    clean_output.loss.backward()
    model.zero_grad()
    assert clean_output.counted_logits is not None and clean_output.labels is case.batch["labels"]
    replay = ran_loss(model, case.batch, config, pixel_box=BOX, memory=memory)
    replay.loss.backward()
    ours = _gradients(model)

    clean = family.run(model, case.batch, case.batch["pixel_values"])
    adversarial = family.run(model, case.batch, replay.adversarial_pixel_values)
    rows = clean.logits_mask.reshape(-1).nonzero().squeeze(1)
    flat = lambda logits: logits.reshape(-1, logits.shape[-1]).index_select(0, rows)  # noqa: E731
    kl = rectification_kl_reference(flat(clean.logits).detach(), flat(adversarial.logits))
    reference = adversarial.loss + 2.0 * kl
    assert replay.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(replay.counted_logits, flat(adversarial.logits).detach(), rtol=1e-5, atol=1e-6)
    reference.backward()
    _assert_same_gradients(ours, _gradients(model))


def test_free_replay_needs_the_backward_between_replays():
    case = tm.convnext()
    model, config = _peft(case, free_replay=2)
    memory = RecipeMemory()
    ran_loss(model, case.batch, config, pixel_box=BOX, memory=memory)
    with pytest.raises(RuntimeError, match=r"call `.backward\(\)` on every step's loss"):
        ran_loss(model, case.batch, config, pixel_box=BOX, memory=memory)


def _image_feature_step(case, **recipe):
    """One `adversarial_pass='image_features'` step on a tiny LLaVA, backward included: the model, its config, the
    step's output and its gradients. The language model runs once (the clean pass): neither the attack nor the
    adversarial pass runs it."""
    model, config = _peft(
        case,
        adversarial_pass="image_features",
        kl_weight=0.0,
        adversarial_weight=0.0,
        target_modules=r".*(q_proj|v_proj|linear_1|linear_2)",
        **recipe,
    )
    language_model = model.base_model.model.model.language_model
    calls = []
    language_model.register_forward_hook(lambda *args: calls.append(1))
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    assert len(calls) == 1
    output.loss.backward()
    return model, config, output, _gradients(model)


def _image_feature_reference(model, case, output, weight):
    """The written loss: the clean task loss + `weight` * |z(x + delta) - z_0(x)|^2 (features of the vision tower and
    projector, z_0 with the adapter disabled); returns it and the consistency term."""
    clean = detect_family(model).run(model, case.batch, case.batch["pixel_values"])
    with torch.no_grad(), model.disable_adapter():
        reference_features = vision_tower_features(model, case.batch, case.batch["pixel_values"])
    adversarial_features = vision_tower_features(model, case.batch, output.adversarial_pixel_values)
    assert adversarial_features.shape == (2 * (tm.IMAGE_SIZE // 4) ** 2, 32)  # one row per image token
    consistency = (adversarial_features - reference_features).pow(2).sum(-1).mean()
    return clean.loss + weight * consistency, consistency


def test_image_feature_pass_runs_no_language_model_and_gives_the_written_loss():
    case = tm.llava()
    model, config, output, ours = _image_feature_step(
        case, attack_loss="consistency", consistency_weight=3.0, free_start=False
    )
    moved = _in_pixels(output.adversarial_pixel_values) - _in_pixels(case.batch["pixel_values"])
    assert 0 < moved.abs().max().item() <= config.epsilon + 1e-6

    reference, consistency = _image_feature_reference(model, case, output, 3.0)
    assert output.parts["consistency"].item() == pytest.approx(consistency.item(), rel=1e-5)
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    reference.backward()
    _assert_same_gradients(ours, _gradients(model))


def test_image_feature_pass_with_the_task_attack_steps_along_the_clean_answer_gradient():
    """attack_loss='task': the one attack step is the clean task loss's input gradient (free start), so the language
    model still runs once; the perturbation is eps * sign(that gradient), cut to the pixel box."""
    case = tm.llava()
    model, config, output, ours = _image_feature_step(
        case, attack_loss="task", consistency_weight=2.0, random_start=False
    )
    pixels = case.batch["pixel_values"].detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(detect_family(model).run(model, case.batch, pixels).loss, [pixels])
    clean_pixels = _in_pixels(case.batch["pixel_values"])
    expected = (clean_pixels + config.epsilon * gradient.sign()).clamp(0, 1)
    torch.testing.assert_close(_in_pixels(output.adversarial_pixel_values), expected, rtol=0, atol=1e-5)

    reference, _ = _image_feature_reference(model, case, output, 2.0)
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    reference.backward()
    _assert_same_gradients(ours, _gradients(model))


def test_image_feature_pass_says_what_it_needs():
    with pytest.raises(ValueError, match=r"RANConfig.consistency_weight=0.0 is not allowed: a weight > 0"):
        RANConfig(target_modules=["q_proj"], adversarial_pass="image_features")
    with pytest.raises(
        ValueError, match=r"RANConfig.attack_loss='kl' is not allowed: 'consistency' or 'task'"
    ):
        RANConfig(target_modules=["q_proj"], adversarial_pass="image_features", attack_loss="kl")
    for field, value in (("free_start", False), ("attack_steps", 2)):
        with pytest.raises(
            ValueError, match=rf"RANConfig.{field}={value} is not allowed: .*attack_loss='task'"
        ):
            RANConfig(
                target_modules=["q_proj"], adversarial_pass="image_features", consistency_weight=1.0, kl_weight=0.0,
                adversarial_weight=0.0, **{field: value},
            )  # fmt: skip
    case = tm.convnext()
    model, config = _peft(
        case, adversarial_pass="image_features", attack_loss="consistency", consistency_weight=1.0, kl_weight=0.0,
        adversarial_weight=0.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="get_image_features"):
        ran_loss(model, case.batch, config, pixel_box=BOX)
