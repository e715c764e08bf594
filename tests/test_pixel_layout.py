"""The pixel-layout concept: recognising a batch's layout, stating it, and every pixel path using it (range check,
evaluation attacks, the L2 ball)."""

from __future__ import annotations

import architectures as arch
import pytest
import torch
from peft import get_peft_model

import ran_peft.evaluation as evaluation
from ran_peft import (
    AttackBudget,
    BatchPixelBox,
    PatchRowLayout,
    PatchSequenceLayout,
    PixelBox,
    PixelLayoutError,
    RANConfig,
    evaluate_robustness,
    pgd_perturb,
    ran_loss,
)
from ran_peft.families import check_pixel_range

BOX = PixelBox(arch.MEAN, arch.STD)


def test_layouts_are_recognised_from_batch_keys_and_processor_attributes():
    qwen, siglip2 = arch.qwen2_vl(), arch.siglip2()
    placed = BatchPixelBox.place(BOX, qwen.batch, "auto", qwen.processor)
    assert placed.placement.layout == "patch_rows"
    assert BatchPixelBox.place(BOX, qwen.batch).placement.layout == "patch_rows"  # from the batch alone too
    assert BatchPixelBox.place(BOX, siglip2.batch).placement.layout == "patch_sequence"
    idefics = arch.idefics3()
    assert (
        BatchPixelBox.place(BOX, idefics.batch, "auto", idefics.processor).placement.layout
        == "channels_first"
    )
    # Qwen rows are channel-major: channel c spans columns [c*T*P*P, (c+1)*T*P*P) of each row
    row = placed.std.reshape(-1)
    width = qwen.batch["pixel_values"].shape[1]
    assert row.shape == (width,) and row[width // 3 - 1].item() == pytest.approx(arch.STD[0])
    assert row[width // 3].item() == pytest.approx(arch.STD[1])


def test_a_processor_that_announces_another_layout_than_the_batch_is_an_error():
    qwen, vit = arch.qwen2_vl(), arch.vit()
    with pytest.raises(
        PixelLayoutError, match=r"announces patch_rows pixels but the batch looks like channels_first"
    ):
        BatchPixelBox.place(BOX, vit.batch, "auto", qwen.processor)


def test_patch_sizes_from_the_processor_are_checked_against_the_rows():
    qwen = arch.qwen2_vl()
    with pytest.raises(
        PixelLayoutError, match=r"patch_size=14 and temporal_patch_size=2 with 3 channels make rows of"
    ):
        BatchPixelBox.place(BOX, qwen.batch, PatchRowLayout(patch_size=14, temporal_patch_size=2))
    siglip2 = arch.siglip2()
    with pytest.raises(PixelLayoutError, match=r"patch_size=16 with 3 channels"):
        BatchPixelBox.place(BOX, siglip2.batch, PatchSequenceLayout(patch_size=16))


def test_a_stated_layout_trains_a_batch_auto_cannot_place():
    """A NaFlex batch without `spatial_shapes` or mask (a wrapper model carries them): auto refuses to guess, a
    stated layout trains."""
    siglip2 = arch.siglip2(batch=4)
    batch = {key: value for key, value in siglip2.batch.items() if key == "input_ids"}
    batch["pixel_values"] = siglip2.batch["pixel_values"]
    model = get_peft_model(siglip2.model, RANConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    shapes = {key: siglip2.batch[key] for key in ("spatial_shapes", "pixel_attention_mask")}

    def forward(**inputs):  # a model wrapper that carries the NaFlex shapes itself
        return model(**inputs, **shapes)

    with pytest.raises(PixelLayoutError, match=r"shape \(4, 16, 192\).*RANConfig\(pixel_layout=\.\.\.\)"):
        ran_loss(model, batch, RANConfig(r=4), pixel_box=BOX, forward=forward)
    config = RANConfig(r=4, pixel_layout="patch_sequence")
    output = ran_loss(model, batch, config, pixel_box=BOX, forward=forward)
    delta = (output.adversarial_pixel_values - batch["pixel_values"]) * torch.tensor(arch.STD).repeat(64)
    assert delta.abs().max().item() == pytest.approx(config.epsilon, abs=1e-6)


def test_the_range_check_reads_channels_where_the_layout_puts_them_and_skips_padding():
    siglip2 = arch.siglip2()
    batch = dict(siglip2.batch)
    placed = BatchPixelBox.place(BOX, batch)
    padding = ~batch["pixel_attention_mask"].bool()
    assert padding.any()
    garbage = batch["pixel_values"].clone()
    garbage[padding] = 1000.0  # never looked at
    check_pixel_range(garbage, placed)
    raw = (placed.to_pixels(batch["pixel_values"]) * 255).clamp(0, 255)  # raw 0-255 pixels, not normalised
    with pytest.raises(ValueError, match=r"do not fit the pixel normalisation.*per channel they span"):
        check_pixel_range(raw, placed)
    qwen = arch.qwen2_vl()
    rows = BatchPixelBox.place(BOX, qwen.batch)
    low, high = rows.channel_ranges(rows.to_pixels(qwen.batch["pixel_values"]))
    assert low.min().item() >= -1e-5 and high.max().item() <= 1 + 1e-5 and low.shape == (3,)


def test_l2_budget_is_per_sequence_for_naflex_and_refused_for_rows_of_unequal_images():
    siglip2 = arch.siglip2()
    placed = BatchPixelBox.place(BOX, siglip2.batch)
    pixels = torch.zeros_like(siglip2.batch["pixel_values"])  # the mean colour: far from the box's edges
    budget = AttackBudget(epsilon=0.5, step_size=0.5, steps=1, norm="l2", random_start=False)
    weight = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    adversarial = pgd_perturb(lambda x, text: (x * weight).sum(), pixels, placed, budget)
    size = ((adversarial - pixels) * placed.std).flatten(1).norm(dim=1)
    assert size.tolist() == pytest.approx([0.5] * 3, abs=1e-5)  # the ball over each sequence's real patches
    assert not (adversarial - pixels)[~siglip2.batch["pixel_attention_mask"].bool()].any()
    qwen = arch.qwen2_vl()
    rows = BatchPixelBox.place(BOX, qwen.batch)
    with pytest.raises(ValueError, match=r"attack_norm='l2' needs each sample to be a fixed block.*'linf'"):
        pgd_perturb(lambda x, text: x.sum(), qwen.batch["pixel_values"], rows, budget)


@pytest.mark.parametrize("name", ["qwen2_vl", "siglip2", "idefics3"])
def test_evaluation_attacks_use_the_layout_and_never_touch_padding(name, monkeypatch):
    torch.manual_seed(0)
    architecture = arch.ARCHITECTURES[name]()
    seen = []
    perturb = evaluation.pgd_perturb

    def recording_perturb(loss_fn, pixel_values, box, budget, **kwargs):
        adversarial = perturb(loss_fn, pixel_values, box, budget, **kwargs)
        seen.append((box, (adversarial - pixel_values).detach(), budget.epsilon))
        return adversarial

    monkeypatch.setattr(evaluation, "pgd_perturb", recording_perturb)
    report = evaluate_robustness(
        architecture.model,
        [architecture.batch],
        pixel_box=BOX,
        epsilons=(4 / 255,),
        steps=2,
        check_steps=False,
    )
    assert report.num_samples > 0 and seen
    padding = architecture.padding(architecture.batch) if architecture.padding else None
    for box, delta, epsilon in seen:
        assert box.placement.layout == architecture.layout
        if padding is not None:
            assert not delta[padding].any()
        if epsilon > 0:
            assert box.linf_in_pixels(delta).max().item() == pytest.approx(epsilon, abs=1e-6)


def test_a_layout_stated_to_the_callback_is_the_one_used(tmp_path):
    """RANCallback(pixel_layout=...) reaches every batch: Qwen rows stated as channel-first images are refused with
    the shape, not reinterpreted."""
    from transformers import Trainer, TrainingArguments

    from ran_peft import RANCallback

    qwen = arch.qwen2_vl()
    model = get_peft_model(qwen.model, RANConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[qwen.batch],
        data_collator=lambda items: items[0],
        processing_class=qwen.processor,
        callbacks=[RANCallback(pixel_layout="channels_first")],
    )
    with pytest.raises(PixelLayoutError, match=r"shape \(40, 384\).*image_grid_thw.*at least 3 dims"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ padding markers
# Found by the registry sweep (tests/test_registry_sweep.py): each of these was perturbed, or a wrong budget, before.


def _linf_attack(batch, layout="auto", processor=None, box=BOX):
    """One sign step from the clean pixels on a fixed random objective: every real element inside the box moves by
    epsilon (pixels at the box's edge may be held there)."""
    placed = BatchPixelBox.place(box, batch, layout, processor)
    pixels = batch["pixel_values"]
    weight = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    budget = AttackBudget(epsilon=4 / 255, step_size=4 / 255, steps=1, random_start=False)
    return placed, pgd_perturb(lambda x, text: (x * weight).sum(), pixels, placed, budget) - pixels


def test_patch_sequences_with_position_ids_of_minus_one_keep_their_padding_patches():
    """Gemma 4's processor marks padding patches with position ids (-1, -1) and no `pixel_attention_mask`: auto
    used to refuse the batch, and the stated `patch_sequence` moved the padding patches."""
    pixels = torch.rand(2, 6, 12)
    positions = torch.arange(6).repeat(2, 1)[..., None].repeat(1, 1, 2)
    pixels[0, 4:] = 0
    positions[0, 4:] = -1
    batch = {"pixel_values": pixels, "image_position_ids": positions, "input_ids": torch.zeros(2, 3).long()}
    for layout in ("auto", "patch_sequence"):
        placed, delta = _linf_attack(batch, layout)
        assert placed.placement.layout == "patch_sequence"
        assert not delta[0, 4:].any()
        assert (delta[1].abs() * torch.tensor(arch.STD).repeat(4)).max().item() == pytest.approx(
            4 / 255, abs=1e-6
        )


def test_a_stated_patch_sequence_without_markers_keeps_all_zero_patches_clean():
    pixels = torch.rand(2, 5, 12)
    pixels[1, 3:] = 0
    _, delta = _linf_attack({"pixel_values": pixels}, "patch_sequence")
    assert not delta[1, 3:].any() and delta[1, :3].ne(0).all()


def test_zero_margins_outside_image_sizes_are_padding_and_other_sizes_are_not_read_as_such():
    """Pixtral-style batches pad smaller images with zeros to the largest; `image_sizes` gives the real region."""
    import transformers as tf

    processor = tf.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8, image_mean=arch.MEAN,
                                            image_std=arch.STD)  # fmt: skip
    batch = dict(processor(images=arch.images(2, sizes=[(32, 32), (16, 24)]), return_tensors="pt"))
    assert batch["image_sizes"].tolist() == [[32, 32], [16, 24]]
    _, delta = _linf_attack(batch, processor=processor)
    assert not delta[1, :, 16:].any() and not delta[1, :, :, 24:].any()
    std = torch.tensor(arch.STD).view(3, 1, 1)
    for real in (delta[1, :, :16, :24], delta[0]):
        assert (real.abs() * std).max().item() == pytest.approx(4 / 255, abs=1e-6)
    # Sizes that are not a zero-padded region (original sizes of another processor) mark nothing.
    other = {"pixel_values": torch.rand(2, 3, 8, 8), "image_sizes": torch.tensor([[4, 4], [8, 8]])}
    assert BatchPixelBox.place(BOX, other).placement.real is None


def test_a_processor_that_letterboxes_with_its_background_colour_keeps_the_bands_clean():
    """DeepSeek-VL pads images to squares with its `background_color`; a pixel of that colour inside the image is
    still attacked."""
    import numpy as np
    import transformers as tf

    processor = tf.DeepseekVLImageProcessorPil(size={"height": 32, "width": 32})
    image = np.full((16, 32, 3), 200, np.uint8)
    image[4:6, 10:12] = processor.background_color  # the fill colour inside the picture
    batch = dict(processor(images=[image], return_tensors="pt"))
    _, delta = _linf_attack(batch, processor=processor, box=PixelBox.from_processor(processor))
    assert not delta[0, :, :8].any() and not delta[0, :, 24:].any()  # the bands above and below
    assert delta[0, :, 8:24].ne(0).all()


def test_a_crop_larger_than_the_resized_image_pads_black_bands_that_stay_clean():
    """MobileViT's defaults resize to a 224 shortest edge and crop 256: the crop pads 16 black pixels each side,
    and its pixels are not normalised (`do_normalize` is None): the box is [0, 1] itself."""
    import numpy as np
    import transformers as tf

    processor = tf.MobileViTImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 32, "width": 32}
    )
    box = PixelBox.from_processor(processor)
    assert box.mean == (0.0,) and box.std == (1.0,)
    batch = dict(processor(images=[np.full((28, 28, 3), 200, np.uint8)], return_tensors="pt"))
    _, delta = _linf_attack(batch, processor=processor, box=box)
    assert not delta[0, :, :2].any() and not delta[0, :, :, 30:].any()
    assert delta[0, :, 2:30, 2:30].abs().max().item() == pytest.approx(4 / 255, abs=1e-6)


@pytest.mark.parametrize("include_top", [False, True])
def test_the_pixel_box_follows_the_processors_rescale_offset_and_include_top(include_top):
    """EfficientNet's processor can rescale to [-1, 1] (`rescale_offset`) before normalising, and with `include_top`
    (its default) divides by the std once more."""
    import numpy as np
    import transformers as tf

    processor = tf.EfficientNetImageProcessorPil(
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        include_top=include_top,
        image_mean=arch.MEAN,
        image_std=arch.STD,
    )
    box = PixelBox.from_processor(processor)
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    std = std * std if include_top else std
    grey = processor(images=[np.full((8, 8, 3), 51, np.uint8)], return_tensors="pt")["pixel_values"][
        0, :, 0, 0
    ]
    assert grey.tolist() == pytest.approx(((51 / 127.5 - 1 - mean) / std).tolist(), rel=1e-5)
    for pixel in (0.0, 0.2, 1.0):
        expected = (pixel * 255 / 127.5 - 1 - mean) / std
        assert ((pixel - torch.tensor(box.mean)) / torch.tensor(box.std)).tolist() == pytest.approx(
            expected.tolist(), rel=1e-6
        )


def test_a_per_image_mask_in_an_image_list_marks_the_padding_images():
    """Granite-Docling's `pixel_attention_mask` is (B, I): one flag per image, not per pixel."""
    pixels = torch.rand(2, 3, 3, 8, 8)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    _, delta = _linf_attack({"pixel_values": pixels, "pixel_attention_mask": mask})
    assert not delta[mask == 0].any() and delta[mask == 1].ne(0).all()


def test_channel_first_patches_beside_a_patch_row_processor_are_channel_first():
    """PaddleOCR-VL's processor has Qwen-style patch sizes but keeps each patch as a (C, P, P) image."""
    qwen = arch.qwen2_vl()
    grid = qwen.batch["image_grid_thw"]
    patches = torch.randn(int(grid.prod(-1).sum()), 3, 8, 8)
    batch = {"pixel_values": patches, "image_grid_thw": grid}
    assert BatchPixelBox.place(BOX, batch, "auto", qwen.processor).placement.layout == "channels_first"
    with pytest.raises(PixelLayoutError, match="announces patch_rows"):
        BatchPixelBox.place(BOX, {"pixel_values": torch.randn(5, 3, 8, 8), "image_grid_thw": grid}, "auto",
                            qwen.processor)  # fmt: skip
