"""Tiny generative VLMs (LLaVA, Gemma 3, Qwen2-VL) with their real processor classes, built offline, and rows in
TRL's conversational format (`messages` + `images`)."""

from __future__ import annotations

from collections.abc import Callable

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)

from ran_peft.text import build_word_tokenizer

QUESTIONS = ("which organ is shown ?", "what is the modality ?")
ANSWERS = ("lung", "liver", "brain", "ct", "mri", "x-ray")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
# One template for every family: each message's parts in order; images become the processor's image token.
_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ IMAGE }} {% else %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
_WIDTH = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)


def _tokenizer(special: dict[str, str]):
    tokenizer = build_word_tokenizer([*QUESTIONS, *ANSWERS, "user assistant :"], max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special.values())})
    for name, token in special.items():
        setattr(tokenizer, name, token)
        setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    return tokenizer


def _template(image_text: str) -> str:
    return _TEMPLATE.replace("{{ IMAGE }}", image_text)


def llava():
    """(model, processor): a CLIP vision tower (16 px, patch 4) and a Llama language model."""
    tokenizer = _tokenizer({"image_token": "<image>"})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_mean=list(MEAN),
        image_std=list(STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_template("<image>"),
    )
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_WIDTH, "image_size": 16, "patch_size": 4},
        text_config=LlamaConfig(
            **_WIDTH,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        image_token_index=tokenizer.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config), processor


def gemma3():
    """(model, processor): a SigLIP vision tower (28 px, patch 7, 4 image tokens) and a Gemma 3 language model."""
    tokenizer = _tokenizer(
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": 28, "width": 28}, image_mean=list(MEAN), image_std=list(STD)
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=_template("<start_of_image>"),
    )
    config = Gemma3Config(
        text_config=dict(
            **_WIDTH,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            sliding_window=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(**_WIDTH, image_size=28, patch_size=7),
        mm_tokens_per_image=4,
        image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises its image projection to zeros (a random model would ignore the image): give it weights.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return model, processor


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor, which needs torchvision (absent beside CPU torch 2.13)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
        self.image_token_id, self.video_token_id = tokenizer.image_token_id, tokenizer.video_token_id
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen2_vl():
    """(model, processor): a Qwen2-VL vision tower (28 px, patch 14, merge 2: one image token) and language model."""
    tokenizer = _tokenizer(
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        }
    )
    image_processor = Qwen2VLImageProcessor(
        min_pixels=28 * 28, max_pixels=28 * 28, image_mean=list(MEAN), image_std=list(STD), patch_size=14
    )
    processor = _ImageOnlyQwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    config = Qwen2VLConfig(
        text_config=dict(
            **_WIDTH,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            in_chans=3,
        ),
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config), processor


GENERATIVE: dict[str, Callable] = {"llava": llava, "gemma3": gemma3, "qwen2_vl": qwen2_vl}


def vqa_rows(n: int = 8, seed: int = 0, size: int = 32) -> datasets.Dataset:
    """Rows in TRL's conversational vision format: `messages` (user: image + question; assistant: answer) and
    `images` (one PIL image)."""
    rng = np.random.default_rng(seed)
    rows = {"messages": [], "images": []}
    for index in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        rows["images"].append([Image.fromarray(pixels)])
        rows["messages"].append(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[index % 2]}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[index % len(ANSWERS)]}]},
            ]
        )
    return datasets.Dataset.from_dict(rows)
