"""Video frames beside images: RAN attacks `pixel_values` only, and says so once, with how to change it.

The family is Qwen2-VL as the registry sweep builds it (tiny, from its config class, with its real image processor).
Its video processor needs torchvision, which does not import beside this torch, so the clip is built by the image
processor: one image patched with `temporal_patch_size=2` is exactly the patch rows of a two-frame still clip
(`pixel_values_videos` with `video_grid_thw`), which the model reads through its video path.
"""

from __future__ import annotations

import warnings

import pytest
import registry_models as registry
import torch
from peft import get_peft_model

from ran_peft import PixelBox, RANConfig, UnattackedPixelsWarning, ran_loss
from ran_peft.families import GenerativeFamily


def tiny_qwen2_vl_with_a_clip() -> tuple[registry.TinyFamily, dict]:
    """The tiny Qwen2-VL and its batch with a two-frame clip per sample before the image prompt."""
    family = next(
        family for family in registry.registry_families() if family.id == "image-text-to-text:qwen2_vl"
    )
    tiny = registry.build_tiny(family)
    config = tiny.model.config
    clip = registry.process(tiny.image_processor, registry.images([(32, 32)], seed=1))
    grid = clip["image_grid_thw"]
    frames = clip["pixel_values"].repeat(tiny.batch["input_ids"].shape[0], 1)  # one clip per sample
    video_tokens = int(grid.prod()) // config.vision_config.spatial_merge_size**2
    rows = tiny.batch["input_ids"]
    video = torch.tensor([config.vision_start_token_id] + [config.video_token_id] * video_tokens
                         + [config.vision_end_token_id]).repeat(rows.shape[0], 1)  # fmt: skip
    input_ids = torch.cat([video, rows], dim=1)
    batch = {
        **tiny.batch,
        "input_ids": input_ids,
        "attention_mask": torch.cat([torch.ones_like(video), tiny.batch["attention_mask"]], dim=1),
        "labels": torch.cat([torch.full_like(video, -100), tiny.batch["labels"]], dim=1),
        "mm_token_type_ids": (input_ids == config.image_token_id).long()
        + 2 * (input_ids == config.video_token_id),
        "pixel_values_videos": frames,
        "video_grid_thw": grid.repeat(rows.shape[0], 1),
    }
    return tiny, batch


@pytest.fixture(scope="module")
def qwen2_vl_with_a_clip():
    return tiny_qwen2_vl_with_a_clip()


def test_the_model_reads_the_frames(qwen2_vl_with_a_clip):
    tiny, batch = qwen2_vl_with_a_clip
    with torch.no_grad():
        clean = tiny.model(**batch).loss
        moved = tiny.model(**{**batch, "pixel_values_videos": batch["pixel_values_videos"] + 0.5}).loss
    assert clean.item() != moved.item()


def test_frames_stay_clean_images_get_the_exact_budget_and_ran_says_so_once(qwen2_vl_with_a_clip):
    tiny, batch = qwen2_vl_with_a_clip
    config = RANConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny.model, config).train()
    box = PixelBox.from_processor(tiny.image_processor)
    frames_seen = []

    def forward(
        **inputs,
    ):  # the model's own forward, noting the frames of every pass (clean, attack, adversarial)
        frames_seen.append(inputs["pixel_values_videos"].detach().clone())
        return model(**inputs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [
            ran_loss(model, batch, config, pixel_box=box, processor=tiny.image_processor, forward=forward)
            for _ in range(2)
        ]
    said = [warning for warning in caught if issubclass(warning.category, UnattackedPixelsWarning)]
    assert len(said) == 1
    message = str(said[0].message)
    assert "`pixel_values_videos`" in message and "video frames" in message and "images=" in message
    std = torch.tensor(box.std).repeat_interleave(batch["pixel_values"].shape[1] // 3)
    for output in outputs:
        delta = output.adversarial_pixel_values - batch["pixel_values"]
        assert (delta.abs() * std).max().item() == pytest.approx(config.epsilon, abs=1e-6)
    assert len(frames_seen) >= 2 * len(outputs)  # at least the clean and adversarial passes of each step
    assert all(torch.equal(frames, batch["pixel_values_videos"]) for frames in frames_seen)


def test_a_batch_of_frames_alone_is_refused_with_what_to_do(qwen2_vl_with_a_clip):
    tiny, batch = qwen2_vl_with_a_clip
    frames_only = {
        key: value for key, value in batch.items() if key not in ("pixel_values", "image_grid_thw")
    }
    with pytest.raises(
        ValueError, match=r"`pixel_values_videos`: RAN attacks `pixel_values` only.*video frames"
    ):
        GenerativeFamily().check_inputs(frames_only)
