"""Per-family facts the generic shrinker cannot know, keyed by the registry's model type: a processor's minimum
patch budget, a list that must keep a length, an input only one family's forward needs.

Every entry says why it is there. A family without an entry is built by the generic rules alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Override:
    config: dict[str, Any] = field(default_factory=dict)  # set on the tiny config dict, after shrinking
    config_defaults: dict[str, Any] = field(
        default_factory=dict
    )  # passed to the config class before shrinking
    processor: dict[str, Any] = field(default_factory=dict)  # passed to the image processor class
    image_processor: str | None = None  # the PIL image processor class, where the registry names none
    patch_size: int | None = None
    mrope: bool = (
        False  # the text's rotary embedding has (time, height, width) sections the config does not declare
    )
    image_size: int | None = None  # the tiny model's (and processor's) image size
    image_sizes: list[tuple[int, int]] | None = None  # the raw images of the batch (height, width)
    image_tokens: int | None = None  # image tokens per sample, where the model cannot count its features
    image_token: int | None = None  # the placeholder token id, where the config names none
    extra_inputs: dict[str, Callable[[dict, dict], Any]] = field(default_factory=dict)
    prepare_model: tuple[Callable[[Any], None], ...] = ()
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # RANConfig fields this family needs
    label_names: list[str] | None = None  # TrainingArguments.label_names
    not_buildable: tuple[str, str] | None = None  # (reason, detail)


def _qformer_text(batch: dict, processed: dict) -> torch.Tensor:
    """A short instruction for the Q-Former (InstructBLIP reads one beside the language model's prompt)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(4, 100, (batch["input_ids"].shape[0], 5), generator=generator)


def _cross_attention_mask(batch: dict, processed: dict) -> torch.Tensor:
    """Mllama: every text position attends to every real tile of the sample's image(s)."""
    tiles = processed["aspect_ratio_mask"].long()  # (B, I, T)
    return tiles[:, None].expand(-1, batch["input_ids"].shape[1], -1, -1).contiguous()


# Idefics3 and SmolVLM split big images into tiles: one tile per image, of the tiny tower's size.
_ONE_TILE = Override(
    image_size=128,
    processor={
        "do_image_splitting": False,
        "size": {"longest_edge": 128},
        "max_image_size": {"longest_edge": 128},
    },
)

# Their language models rotate (time, height, width) sections of each head, with the split fixed in the model code.
_MROPE = Override(mrope=True)

OVERRIDES: dict[str, Override] = {
    # Aria's processor makes 490 or 980 pixel images only, and its projector maps each patch count it supports to a
    # query count: 490 pixels in 70-pixel patches are 49 patches, mapped to 4 queries.
    "aria": Override(
        image_size=490,
        processor={"max_image_size": 490, "min_image_size": 490},
        config={"vision_config": {"patch_size": 70}, "projector_patch_to_query_dict": {49: 4}},
    ),
    # EfficientNet's last convolution is 1280 channels times the width coefficient (0.25 when tiny), and its head
    # reads `hidden_dim` of them.
    "efficientnet": Override(config={"hidden_dim": 320}),
    # MobileViTv2 downsamples 32 times before its last attention blocks, which fold 2 x 2 patches.
    "mobilevitv2": Override(image_size=128),
    # CvT reads stage i's drop-path rate at index i of a list as long as that stage's depth: depth i + 1 at least.
    "cvt": Override(config={"depth": [1, 2, 3]}),
    # Only the Q-Former layers that read the text have a feed-forward for it; retrieval reads the text.
    "blip-2": Override(config={"qformer_config": {"use_qformer_text_input": True}}),
    # Multi-head latent attention: the sliding-window heads are as wide as the latent query and rotary parts.
    "dots3_note": Override(
        config={
            "text_config": {"qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "swa_head_dim": 16, "head_dim": 16}
        }
    ),
    # Kosmos-2 takes its image embeddings at the positions `image_embeds_position_mask` marks (its processor puts
    # placeholder tokens there): one per latent query.
    "kosmos-2": Override(
        image_tokens=4,
        image_token=150,
        extra_inputs={
            "image_embeds_position_mask": lambda batch, processed: (batch["input_ids"] == 150).long()
        },
    ),
    # Kosmos-2.5 patches whole images into at most `max_patches` flattened patches: a few are enough.
    "kosmos-2.5": Override(processor={"max_patches": 16}),
    "glm46v": _MROPE,
    "glmga": _MROPE,
    "paddleocr_vl": _MROPE,
    "idefics3": _ONE_TILE,
    "smolvlm": _ONE_TILE,
    # The Q-Former's query tokens are the image tokens; it also reads an instruction of its own.
    "instructblip": Override(
        image_tokens=4,
        extra_inputs={
            "qformer_input_ids": _qformer_text,
            "qformer_attention_mask": lambda batch, processed: torch.ones_like(batch["qformer_input_ids"]),
        },
    ),
    # The text cross-attends to the image (one image token per sample); the vision output stacks the last layer and
    # one intermediate layer (2 x 32 wide).
    "mllama": Override(
        image_tokens=1,
        config={"vision_config": {"vision_output_dim": 64}},
        extra_inputs={"cross_attention_mask": _cross_attention_mask},
    ),
    # MobileNetV2's TensorFlow-style padding reads its convolutions' `stride`, which LoRA's wrapped convolution
    # does not carry: PyTorch padding (the config's switch) keeps LoRA on the convolutions.
    "mobilenet_v2": Override(config={"tf_padding": False}),
    "mobilenet_v1": Override(config={"tf_padding": False, "classifier_dropout_prob": 0.0}),
}
