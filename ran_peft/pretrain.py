"""Small CLIP-style models pre-trained offline on (optionally noisy) synthetic upstream data: the embedded default
of `examples/finetune.py`, and the upstream models of the noise study. Built on first use and cached on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from ran_peft.data import ImageTextCollator, synthetic_medical_dataset
from ran_peft.text import build_word_tokenizer, synthetic_vocabulary

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)
DEFAULT_MODEL_NAME = "synthetic-medical-clip-v1"
BUILD_MARKER = "ran_peft_build.json"  # written last: a folder holding it is a complete build


def cache_root() -> Path:
    """Where built models are cached: `$RAN_PEFT_CACHE`, else `~/.cache/ran_peft`."""
    return Path(os.environ.get("RAN_PEFT_CACHE", Path.home() / ".cache" / "ran_peft"))


def small_clip_config(
    tokenizer: PreTrainedTokenizerFast, *, image_size: int = 64, width: int = 128
) -> CLIPConfig:
    """A CLIP of about 2M parameters whose text tower pools at this tokenizer's EOS token."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=4,
        image_size=image_size,
        patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def offline_processor(image_size: int = 64, max_length: int = 32) -> CLIPProcessor:
    """An image processor and a word-level tokenizer covering every synthetic caption."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )
    tokenizer = build_word_tokenizer(synthetic_vocabulary(), max_length=max_length)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def pretrain_clip(
    upstream: datasets.Dataset,
    processor: CLIPProcessor,
    *,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
) -> CLIPModel:
    """Contrastive (InfoNCE) pre-training of a small CLIP from scratch on image-caption rows."""
    if len(upstream) < 2:
        raise ValueError(
            f"pre-training needs at least 2 image-caption rows (a contrastive batch), got {len(upstream)}."
        )
    batch_size = min(batch_size, len(upstream))  # with drop_last, a larger batch would yield no batch at all
    torch.manual_seed(seed)
    model = CLIPModel(small_clip_config(processor.tokenizer, image_size=image_size))
    collator = ImageTextCollator(processor.image_processor, processor.tokenizer, mode="contrastive")
    loader = DataLoader(
        upstream,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collator,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1
    )
    model.train()
    bar = tqdm(total=steps, desc="pre-training upstream CLIP", disable=not progress)
    step = 0
    while step < steps:
        for batch in loader:
            loss = model(**batch, return_loss=True).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
    bar.close()
    return model.eval()


def build_default_model(
    cache_dir: str | os.PathLike | None = None,
    *,
    upstream_size: int = 3000,
    steps: int = 300,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """The embedded default model (a small CLIP pre-trained on clean synthetic upstream data), built once.

    Returns its folder (model and processor, `from_pretrained`-ready). The folder appears whole or not at all.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / DEFAULT_MODEL_NAME
    if is_built(folder):
        return folder
    processor = offline_processor()
    upstream = synthetic_medical_dataset(upstream_size, seed=seed + 1000, image_size=64, task="finding")
    model = pretrain_clip(upstream, processor, steps=steps, seed=seed, progress=progress)
    settings = {"upstream_size": upstream_size, "steps": steps, "seed": seed}
    return save_built_model(folder, model, processor, settings)


def is_built(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a complete build by `save_built_model` (its marker is written last)."""
    return (Path(folder) / BUILD_MARKER).is_file()


def save_built_model(folder: str | os.PathLike, model, processor, build_info: dict) -> Path:
    """Save `model` and `processor` (safetensors) into `folder` with a build marker holding `build_info`.

    The folder appears whole or not at all: everything is written to a staging folder beside it, which then
    replaces any incomplete earlier build (one without the marker).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        (staging / BUILD_MARKER).write_text(json.dumps(build_info, indent=2))
        if folder.exists():  # an incomplete earlier build (it has no marker): set it aside, then drop it
            stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# Tiny random models of real architectures, for the examples' `--tiny` runs (same code path as a real model).
TINY_CLIP_NAME = "tiny-random-clip-v1"
TINY_LLAVA_NAME = "tiny-random-llava-v2"  # v2: covers the closed-set questions


def build_tiny_clip() -> Path:
    """A tiny random CLIP with the offline word tokenizer, built once into the cache."""
    folder = cache_root() / TINY_CLIP_NAME
    if is_built(folder):
        return folder
    processor = offline_processor(image_size=32)
    torch.manual_seed(0)
    model = CLIPModel(small_clip_config(processor.tokenizer, image_size=32, width=64))
    return save_built_model(folder, model, processor, {"model": TINY_CLIP_NAME, "seed": 0})


def build_tiny_llava(extra_words: Sequence[str] = ()) -> Path:
    """A tiny random LLaVA (CLIP vision tower, Llama language model) with a real `LlavaProcessor`, built once.

    The processor is a word-level tokenizer over the synthetic questions and captions with an `<image>` token, a
    32-pixel CLIP image processor and a small chat template, so `--tiny` runs the same code path as a real model.
    `extra_words`: text the tokenizer must also cover (e.g. the questions a script asks).
    """
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = cache_root() / TINY_LLAVA_NAME
    if is_built(folder):
        return folder
    image_size, patch_size = 32, 8
    tokenizer = build_word_tokenizer(
        [*synthetic_vocabulary(), "USER: ASSISTANT:", *extra_words], max_length=128
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    chat_template = (
        "{% for message in messages %}{{ message['role'] | upper }}: {% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
        chat_template=chat_template,
    )
    width = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            **width,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config=LlamaConfig(
            **width,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        image_token_index=processor.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    return save_built_model(folder, model, processor, {"model": TINY_LLAVA_NAME, "seed": 0})
