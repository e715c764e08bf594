"""Every tested architecture, with its real image processor and pixel layout, through the stock Trainer with RAN.

For each: two steps; on real elements the perturbation's L-inf in pixel units is exactly epsilon and the adversarial
pixels stay in [0, 1]; padding is untouched; the adversarial loss differs from the clean one; stock PEFT reloads the
adapter with identical outputs. The pixel-unit size is computed here from the processor's mean/std and the layout
as the processor documents it, independently of `ran_peft.pixel_layout`.
"""

from __future__ import annotations

import copy

import architectures as arch
import pytest
import torch
from peft import PeftModel, get_peft_model
from trainer_harness import output_tensor, train_two_steps

from ran_peft import (
    BatchPixelBox,
    PixelBox,
    PixelIndependentWarning,
    PixelLayoutError,
    RANConfig,
    ran_loss,
)


def _std_per_element(layout: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The processor's std at every element of the pixels, from the layout its image processor documents."""
    std = torch.tensor(arch.STD)
    if layout == "channels_first":  # (..., C, H, W)
        return std.view(3, 1, 1).expand(shape)
    if layout == "patch_rows":  # Qwen2-VL rows: (C, T, P, P) flattened
        return std.repeat_interleave(shape[-1] // 3).expand(shape)
    if layout == "patch_sequence":  # SigLIP2 NaFlex patches: (P, P, C) flattened
        return std.repeat(shape[-1] // 3).expand(shape)
    raise AssertionError(layout)


def _train_two_steps(architecture, tmp_path, monkeypatch):
    """Two stock-Trainer steps with RANCallback (RANConfig defaults); returns the model, trainer, attacks seen."""
    config = RANConfig(
        r=4,
        target_modules=architecture.target_modules,
        modules_to_save=architecture.modules_to_save,
        **architecture.recipe,
    )
    model, trainer, attacks = train_two_steps(
        architecture.model,
        architecture.batch,
        architecture.processor,
        config,
        str(tmp_path),
        monkeypatch,
        architecture.label_names,
    )
    return model, config, trainer, [(a.clean, a.adversarial, a.box, a.epsilon) for a in attacks]


@pytest.mark.parametrize("name", list(arch.ARCHITECTURES))
def test_ran_trains_every_architecture_with_its_pixel_layout(name, tmp_path, monkeypatch):
    torch.manual_seed(0)
    architecture = arch.ARCHITECTURES[name]()
    base_twin = copy.deepcopy(architecture.model)
    model, config, trainer, attacks = _train_two_steps(architecture, tmp_path, monkeypatch)

    assert len(attacks) == 2
    padding = architecture.padding(architecture.batch) if architecture.padding else None
    for clean, adversarial, box, epsilon in attacks:
        assert epsilon == config.epsilon
        assert box.placement.layout == architecture.layout
        std = _std_per_element(architecture.layout, tuple(clean.shape))
        mean = clean.new_tensor(arch.MEAN)
        real = torch.ones_like(clean, dtype=torch.bool) if padding is None else ~padding
        size = ((adversarial.float() - clean.float()) * std)[real].abs().max().item()
        assert size == pytest.approx(config.epsilon, abs=1e-6)
        # back to [0, 1] pixels with the same placement of the mean
        if architecture.layout == "channels_first":
            mean = mean.view(3, 1, 1)
        elif architecture.layout == "patch_rows":
            mean = mean.repeat_interleave(clean.shape[-1] // 3)
        else:
            mean = mean.repeat(clean.shape[-1] // 3)
        pixels = (adversarial.float() * std + mean)[real]
        assert pixels.min().item() >= -1e-6 and pixels.max().item() <= 1 + 1e-6
        if padding is not None:
            assert padding.any()
            assert torch.equal(adversarial[padding], clean[padding])

    logged = [entry for entry in trainer.state.log_history if "ran/clean" in entry]
    assert len(logged) == 2
    assert all(entry["ran/adversarial"] != entry["ran/clean"] for entry in logged), logged

    # Stock PEFT reloads the adapter (plain LoRA) with identical outputs.
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_twin, tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        ours = output_tensor(model(**architecture.batch))
        theirs = output_tensor(reloaded(**architecture.batch))
    assert torch.equal(ours, theirs)


def test_siglip2_batch_of_three_gets_epsilon_with_per_channel_statistics_not_five_times_it():
    """The issue's case: a NaFlex batch of 3 used to be read as (C=3, H, W) with the batch axis as colours."""
    architecture = arch.siglip2(batch=3)
    pixel_values = architecture.batch["pixel_values"]
    placed = BatchPixelBox.place(
        PixelBox(arch.MEAN, arch.STD), architecture.batch, "auto", architecture.processor
    )
    assert placed.placement.layout == "patch_sequence"
    config = RANConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(architecture.model, config).train()
    output = ran_loss(
        model,
        architecture.batch,
        config,
        pixel_box=PixelBox(arch.MEAN, arch.STD),
        processor=architecture.processor,
    )
    delta = output.adversarial_pixel_values - pixel_values
    real = architecture.batch["pixel_attention_mask"].bool()
    per_sample = placed.linf_in_pixels(delta)
    assert per_sample.tolist() == pytest.approx([config.epsilon] * 3, abs=1e-6)
    assert (delta[~real] == 0).all()
    independent = (delta * _std_per_element("patch_sequence", tuple(delta.shape)))[real].abs().max()
    assert independent.item() == pytest.approx(config.epsilon, abs=1e-6)


def test_idefics3_samples_with_one_and_two_images_train_with_the_padding_image_untouched(
    tmp_path, monkeypatch
):
    architecture = arch.idefics3(images_per_sample=(1, 2))
    padding_image = architecture.batch["pixel_values"][0, 1]
    assert not padding_image.any()  # the processor's all-zero padding image
    _, _, trainer, attacks = _train_two_steps(architecture, tmp_path, monkeypatch)
    for _, adversarial, _, _ in attacks:
        # still all zero: the model keeps reading it as padding, and its image count still matches its tokens
        assert not adversarial[0, 1].any()
        assert adversarial[1].ne(architecture.batch["pixel_values"][1]).any()
    assert len([entry for entry in trainer.state.log_history if "ran/clean" in entry]) == 2


@pytest.mark.parametrize(
    "make",
    [lambda: arch.mllama(open_gates=False), lambda: arch.gemma3(open_projector=False)],
    ids=["mllama", "gemma3"],
)
def test_a_model_that_ignores_the_pixels_gets_one_warning_saying_so(make):
    torch.manual_seed(0)
    architecture = make()  # fresh: zero cross-attention gates (Mllama), zero projector (Gemma 3)
    config = RANConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(architecture.model, config).train()
    box = PixelBox(arch.MEAN, arch.STD)
    with pytest.warns(PixelIndependentWarning, match="does not depend on the image") as caught:
        for _ in range(2):
            parts = ran_loss(model, architecture.batch, config, pixel_box=box).parts
    assert len([w for w in caught if issubclass(w.category, PixelIndependentWarning)]) == 1
    assert parts["kl"].item() == 0.0 and parts["adversarial"].item() == parts["clean"].item()


def test_blip_vqa_without_logits_says_what_the_kl_term_needs():
    architecture = arch.blip_vqa()
    config = RANConfig(r=4, target_modules=["qkv", "query", "value"])  # default kl_weight=1.0
    model = get_peft_model(architecture.model, config).train()
    with pytest.raises(ValueError, match=r"BlipForQuestionAnswering returns no `logits`.*kl_weight=0"):
        ran_loss(model, architecture.batch, config, pixel_box=PixelBox(arch.MEAN, arch.STD))


def test_a_layout_ran_cannot_place_names_the_shape_the_keys_and_how_to_state_it():
    batch = {"pixel_values": torch.zeros(3, 16, 192), "input_ids": torch.zeros(3, 4, dtype=torch.long)}
    with pytest.raises(
        PixelLayoutError, match=r"shape \(3, 16, 192\).*\['input_ids', 'pixel_values'\].*pixel_layout"
    ):
        BatchPixelBox.place(PixelBox(arch.MEAN, arch.STD), batch)
    placed = BatchPixelBox.place(PixelBox(arch.MEAN, arch.STD), batch, "patch_sequence")
    assert placed.std.shape == (192,) and placed.std[:3].tolist() == pytest.approx(arch.STD)
    with pytest.raises(ValueError, match="RANConfig.pixel_layout='rows'"):
        RANConfig(pixel_layout="rows")
