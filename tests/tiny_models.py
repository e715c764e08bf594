"""Tiny models of real architectures, built from configs (no download), with a batch of matching inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
    ViTForImageClassification,
)

IMAGE_SIZE = 16
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TinyCase:
    name: str
    model: torch.nn.Module
    batch: dict[str, Any]
    target_modules: list[str]
    modules_to_save: list[str] | None = None
    class_text_inputs: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(MEAN),
        image_std=list(STD),
    )


def pixels(batch: int, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    raw = torch.rand(batch, 3, size, size, generator=generator)
    return (raw - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    image_size=IMAGE_SIZE,
    patch_size=4,
)


def vit(batch: int = 4, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    config = ViTConfig(**_VISION, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(seed)
    inputs = {"pixel_values": pixels(batch, g), "labels": torch.randint(0, 3, (batch,), generator=g)}
    return TinyCase("vit", ViTForImageClassification(config), inputs, ["q_proj", "v_proj"], ["classifier"])


def convnext(batch: int = 4, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    config = ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=IMAGE_SIZE
    )
    g = torch.Generator().manual_seed(seed)
    inputs = {"pixel_values": pixels(batch, g), "labels": torch.randint(0, 3, (batch,), generator=g)}
    return TinyCase(
        "convnext", ConvNextForImageClassification(config), inputs, ["pwconv1", "pwconv2"], ["classifier"]
    )


def clip(batch: int = 4, seed: int = 0, prompts: bool = False) -> TinyCase:
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=16)
    g = torch.Generator().manual_seed(seed)
    if prompts:
        class_text = {
            "input_ids": torch.randint(1, 64, (3, 6), generator=g),
            "attention_mask": torch.ones(3, 6, dtype=torch.long),
        }
        inputs = {"pixel_values": pixels(batch, g), "labels": torch.randint(0, 3, (batch,), generator=g)}
        return TinyCase("clip_prompts", CLIPModel(config), inputs, ["q_proj", "v_proj"], None, class_text)
    inputs = {
        "pixel_values": pixels(batch, g),
        "input_ids": torch.randint(1, 64, (batch, 7), generator=g),
        "attention_mask": torch.ones(batch, 7, dtype=torch.long),
    }
    return TinyCase("clip", CLIPModel(config), inputs, ["q_proj", "v_proj"])


def siglip(batch: int = 4, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    config = SiglipConfig(text_config=_TEXT, vision_config=_VISION)
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "pixel_values": pixels(batch, g),
        "input_ids": torch.randint(1, 64, (batch, 7), generator=g),
    }
    return TinyCase("siglip", SiglipModel(config), inputs, ["q_proj", "v_proj"])


def llava(batch: int = 2, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    image_token = 63
    vision = dict(_VISION, projection_dim=16)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **vision},
        text_config=LlamaConfig(**_TEXT).to_dict(),
        image_token_index=image_token,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    num_image_tokens = (IMAGE_SIZE // 4) ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 60, (batch, 8), generator=g)
    input_ids = torch.cat([torch.full((batch, num_image_tokens), image_token), text], dim=1)
    labels = input_ids.clone()
    labels[:, : num_image_tokens + 3] = -100
    inputs = {
        "pixel_values": pixels(batch, g),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
    }
    model = LlavaForConditionalGeneration(config)
    return TinyCase("llava", model, inputs, ["q_proj", "v_proj"])


ALL_CASES = {"vit": vit, "convnext": convnext, "clip": clip, "siglip": siglip, "llava": llava}
