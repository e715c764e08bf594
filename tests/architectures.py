"""Tiny models of the architectures RAN is tested on, each with its real image processor class, built offline.

Every builder returns an `Architecture`: a randomly initialised model (hidden size 16-32, one or two layers), the
processor that makes its pixels, and a batch those pixels came from. Generative VLMs get as many image tokens as
their vision tower makes features, read from the model itself (its own placeholder check), so no per-architecture
token formula is kept here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers as tf


def _pil(name: str) -> type:
    """The image processor class with the PIL backend: `<Name>Pil` where the release has it (the plain name needs
    torchvision there, which does not import beside the CPU torch), else the plain class."""
    return getattr(tf, f"{name}Pil", None) or getattr(tf, name)


IMAGE_SIZE = 32
VOCAB = 128
IMAGE_TOKEN = 120
MEAN = [0.48145466, 0.4578275, 0.40821073]  # per-channel statistics that differ by channel, as real ones do
STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Architecture:
    name: str
    layout: str  # the pixel layout RAN recognises for it
    model: torch.nn.Module
    processor: Any
    batch: dict[str, Any]
    target_modules: list[str]
    modules_to_save: list[str] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # RANConfig fields this architecture needs
    label_names: list[str] | None = None
    padding: Callable[[dict[str, Any]], torch.Tensor] | None = None  # bool mask of padding elements


def images(
    count: int, size: int = IMAGE_SIZE, seed: int = 0, sizes: list[tuple[int, int]] | None = None
) -> list[np.ndarray]:
    """Random RGB images, (height, width, 3) uint8, as a user's data loader hands them to the processor."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(size, size)] * count
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for height, width in sizes]


def _llama(**overrides: Any) -> dict[str, Any]:
    config = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return {**config, **overrides}


_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=1,
    image_size=IMAGE_SIZE,
    patch_size=8,
)
_CLIP_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=3,
)


def _classifier_batch(processor: Any, batch: int = 4, seed: int = 0) -> dict[str, Any]:
    pixels = processor(images=images(batch, seed=seed), return_tensors="pt")
    return {"pixel_values": pixels["pixel_values"], "labels": torch.arange(batch) % 3}


def _caption_batch(processor: Any, batch: int = 4, seed: int = 0, length: int = 7) -> dict[str, Any]:
    pixels = processor(images=images(batch, seed=seed), return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 100, (batch, length), generator=generator)
    input_ids[:, -1] = 3  # CLIP pools at the end-of-text token
    return {**pixels, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def image_feature_count(model: torch.nn.Module, pixels: dict[str, Any], text_hidden: int = 32) -> int:
    """How many image-token embeddings the model makes for these pixels (all samples together), from its own
    `get_image_features` (features are in the language model's width)."""
    inner = model.model
    accepted = inspect.signature(inner.get_image_features).parameters
    with torch.no_grad():
        output = inner.get_image_features(**{key: value for key, value in pixels.items() if key in accepted})
    features = getattr(output, "pooler_output", None)
    features = output if features is None else features
    if isinstance(features, (list, tuple)):
        return sum(feature.numel() for feature in features) // text_hidden
    return features.numel() // text_hidden


def generative_batch(
    model: torch.nn.Module,
    pixels: dict[str, Any],
    image_tokens_per_sample: list[int] | int | None,
    *,
    batch: int,
    seed: int = 0,
    text_length: int = 6,
    prefix: list[int] | None = None,
) -> dict[str, Any]:
    """Prompt = [prefix] + image tokens + text; labels on the last text tokens (a one-label-per-position batch)."""
    if image_tokens_per_sample is None:
        image_tokens_per_sample = image_feature_count(model, pixels) // batch
    if isinstance(image_tokens_per_sample, int):
        image_tokens_per_sample = [image_tokens_per_sample] * batch
    generator = torch.Generator().manual_seed(seed)
    longest = max(image_tokens_per_sample)
    prefix = prefix or []
    rows, labels = [], []
    for count in image_tokens_per_sample:
        text = torch.randint(4, 100, (text_length,), generator=generator).tolist()
        padding = [0] * (longest - count)
        row = padding + prefix + [IMAGE_TOKEN] * count + text
        rows.append(row)
        labels.append([-100] * (len(row) - 3) + text[-3:])
    input_ids = torch.tensor(rows)
    attention_mask = (
        torch.arange(input_ids.shape[1])
        >= torch.tensor([longest - c for c in image_tokens_per_sample])[:, None]
    ).long()
    return {
        **pixels,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor(labels),
    }


# ------------------------------------------------------------------------------------------------ classifiers


def vit() -> Architecture:
    processor = _pil("ViTImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    config = tf.ViTConfig(**_CLIP_VISION, num_labels=3)
    model = tf.ViTForImageClassification(config)
    return Architecture(
        "vit",
        "channels_first",
        model,
        processor,
        _classifier_batch(processor),
        ["q_proj", "v_proj"],
        ["classifier"],
    )


def dinov2() -> Architecture:
    processor = _pil("BitImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=MEAN,
        image_std=STD,
    )
    config = tf.Dinov2Config(**_CLIP_VISION, num_labels=3)
    model = tf.Dinov2ForImageClassification(config)
    return Architecture(
        "dinov2",
        "channels_first",
        model,
        processor,
        _classifier_batch(processor),
        ["q_proj", "v_proj"],
        ["classifier"],
    )


def swin() -> Architecture:
    processor = _pil("ViTImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    config = tf.SwinConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        num_labels=3,
    )
    model = tf.SwinForImageClassification(config)
    return Architecture(
        "swin",
        "channels_first",
        model,
        processor,
        _classifier_batch(processor),
        ["q_proj", "v_proj"],
        ["classifier"],
    )


def resnet() -> Architecture:
    processor = _pil("ConvNextImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    config = tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    model = tf.ResNetForImageClassification(config)
    return Architecture(
        "resnet",
        "channels_first",
        model,
        processor,
        _classifier_batch(processor),
        ["convolution"],
        # BatchNorm's running statistics change in training (as under plain LoRA): save them with the adapter.
        ["classifier", "normalization"],
    )


def convnext() -> Architecture:
    processor = _pil("ConvNextImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    config = tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = tf.ConvNextForImageClassification(config)
    return Architecture(
        "convnext",
        "channels_first",
        model,
        processor,
        _classifier_batch(processor),
        ["pwconv1", "pwconv2"],
        ["classifier"],
    )


# ------------------------------------------------------------------------------------------------ dual encoders


def clip() -> Architecture:
    processor = _pil("CLIPImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=MEAN,
        image_std=STD,
    )
    model = tf.CLIPModel(tf.CLIPConfig(text_config=_CLIP_TEXT, vision_config=_CLIP_VISION, projection_dim=16))
    return Architecture(
        "clip", "channels_first", model, processor, _caption_batch(processor), ["q_proj", "v_proj"]
    )


def siglip() -> Architecture:
    processor = _pil("SiglipImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    model = tf.SiglipModel(tf.SiglipConfig(text_config=_CLIP_TEXT, vision_config=_CLIP_VISION))
    batch = _caption_batch(processor)
    batch.pop("attention_mask")
    return Architecture("siglip", "channels_first", model, processor, batch, ["q_proj", "v_proj"])


def chinese_clip() -> Architecture:
    processor = _pil("ChineseCLIPImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=MEAN,
        image_std=STD,
    )
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        pad_token_id=0,
    )
    model = tf.ChineseCLIPModel(
        tf.ChineseCLIPConfig(text_config=text, vision_config=_CLIP_VISION, projection_dim=16)
    )
    return Architecture(
        "chinese_clip",
        "channels_first",
        model,
        processor,
        _caption_batch(processor),
        ["q_proj", "v_proj", "query", "value"],
    )


def siglip2(batch: int = 3) -> Architecture:
    processor = _pil("Siglip2ImageProcessor")(
        patch_size=8, max_num_patches=16, image_mean=MEAN, image_std=STD
    )
    vision = dict(_CLIP_VISION, num_patches=16)
    vision.pop("image_size")
    model = tf.Siglip2Model(tf.Siglip2Config(text_config=_CLIP_TEXT, vision_config=vision))
    # Images of different aspect ratios: NaFlex pads the shorter patch sequences.
    pixels = processor(
        images=images(batch, sizes=[(32, 32), (32, 16), (16, 32)][:batch] + [(32, 32)] * max(0, batch - 3)),
        return_tensors="pt",
    )
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 100, (batch, 7), generator=generator)
    batch_inputs = {**pixels, "input_ids": input_ids}

    def padding(inputs: dict[str, Any]) -> torch.Tensor:
        return ~inputs["pixel_attention_mask"].bool().unsqueeze(-1).expand(inputs["pixel_values"].shape)

    return Architecture(
        "siglip2", "patch_sequence", model, processor, batch_inputs, ["q_proj", "v_proj"], padding=padding
    )


# ------------------------------------------------------------------------------------------------ generative VLMs


def _blip_processor() -> Any:
    return _pil("BlipImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )


_BLIP_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=1,
    max_position_embeddings=64,
    encoder_hidden_size=32,
    pad_token_id=0,
    bos_token_id=1,
    sep_token_id=2,
)


def blip_captioning(batch: int = 2) -> Architecture:
    processor = _blip_processor()
    config = tf.BlipConfig(
        text_config={**_BLIP_TEXT, "initializer_range": 0.5},
        vision_config={**_CLIP_VISION, "initializer_range": 0.5},
        projection_dim=16,
        initializer_range=0.5,
    )  # wide initialisation: see blip_vqa
    model = tf.BlipForConditionalGeneration(config)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), 0, batch=batch)
    return Architecture(
        "blip_captioning", "channels_first", model, processor, inputs, ["qkv", "query", "value"]
    )


def blip_vqa(batch: int = 2) -> Architecture:
    processor = _blip_processor()
    # A wider initialisation than the default 0.02: through two cross-attentions (image -> question -> answer) a
    # tiny random model's loss otherwise moves by less than float32 resolves (input gradient ~1e-14).
    config = tf.BlipConfig(
        text_config={**_BLIP_TEXT, "initializer_range": 0.5},
        vision_config={**_CLIP_VISION, "initializer_range": 0.5},
        projection_dim=16,
        initializer_range=0.5,
    )
    model = tf.BlipForQuestionAnswering(config)
    generator = torch.Generator().manual_seed(0)
    question = torch.randint(4, 100, (batch, 6), generator=generator)
    answer = torch.randint(4, 100, (batch, 3), generator=generator)
    inputs = {
        **processor(images=images(batch), return_tensors="pt"),
        "input_ids": question,
        "attention_mask": torch.ones_like(question),
        "labels": answer,
    }
    # BlipForQuestionAnswering returns no logits: it trains on its task losses alone.
    recipe = {"kl_weight": 0.0}
    return Architecture(
        "blip_vqa", "channels_first", model, processor, inputs, ["qkv", "query", "value"], recipe=recipe
    )


def _opt(**overrides: Any) -> dict[str, Any]:
    return dict(
        model_type="opt",
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )


_QFORMER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=1,
    encoder_hidden_size=32,
    max_position_embeddings=64,
    pad_token_id=0,
)


def blip2(batch: int = 2) -> Architecture:
    processor = _blip_processor()
    config = tf.Blip2Config(
        vision_config=_CLIP_VISION, qformer_config=_QFORMER, text_config=_opt(), num_query_tokens=4,
        image_token_index=IMAGE_TOKEN,
    )  # fmt: skip
    model = tf.Blip2ForConditionalGeneration(config)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), 4, batch=batch)
    return Architecture("blip2", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def instructblip(batch: int = 2) -> Architecture:
    processor = _blip_processor()
    config = tf.InstructBlipConfig(
        vision_config=_CLIP_VISION, qformer_config=_QFORMER, text_config=_opt(), num_query_tokens=4,
        image_token_index=IMAGE_TOKEN,
    )  # fmt: skip
    model = tf.InstructBlipForConditionalGeneration(config)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), 4, batch=batch)
    generator = torch.Generator().manual_seed(1)
    inputs["qformer_input_ids"] = torch.randint(4, 100, (batch, 5), generator=generator)
    inputs["qformer_attention_mask"] = torch.ones_like(inputs["qformer_input_ids"])
    return Architecture("instructblip", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def llava(batch: int = 2) -> Architecture:
    processor = _pil("CLIPImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=MEAN,
        image_std=STD,
    )
    config = tf.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_CLIP_VISION}, text_config=_llama(),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
    )  # fmt: skip
    model = tf.LlavaForConditionalGeneration(config)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), None, batch=batch)
    return Architecture("llava", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def llava_next(batch: int = 2) -> Architecture:
    """A wide and a square image: the square one has fewer tiles, and the processor pads it with a zero tile."""
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, IMAGE_SIZE * 2], [IMAGE_SIZE * 2, IMAGE_SIZE]]
    processor = _pil("LlavaNextImageProcessor")(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints, image_mean=MEAN, image_std=STD,
    )  # fmt: skip
    config = tf.LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", **_CLIP_VISION}, text_config=_llama(),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
    )  # fmt: skip
    model = tf.LlavaNextForConditionalGeneration(config)
    pixels = processor(images=images(batch, sizes=[(32, 64), (32, 32)] * (batch // 2)), return_tensors="pt")
    tokens = [
        image_feature_count(
            model, {key: pixels[key][index : index + 1] for key in ("pixel_values", "image_sizes")}
        )
        for index in range(batch)
    ]
    inputs = generative_batch(model, pixels, tokens, batch=batch)

    def padding(batch_inputs: dict[str, Any]) -> torch.Tensor:
        pixel_values = batch_inputs["pixel_values"]
        zero_tiles = ~pixel_values.ne(0).flatten(-3).any(-1)
        return zero_tiles[..., None, None, None].expand(pixel_values.shape)

    return Architecture(
        "llava_next", "channels_first", model, processor, inputs, ["q_proj", "v_proj"], padding=padding
    )


def gemma3(batch: int = 2, open_projector: bool = True) -> Architecture:
    processor = _pil("Gemma3ImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    text = dict(
        model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = dict(_CLIP_VISION, model_type="siglip_vision_model")
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN,
        boi_token_index=121, eoi_token_index=122,
    )  # fmt: skip
    model = tf.Gemma3ForConditionalGeneration(config)
    if (
        open_projector
    ):  # a fresh Gemma 3's projector is zero (the text ignores the image), unlike a checkpoint's
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), 4, batch=batch)
    inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE_TOKEN).long()
    return Architecture("gemma3", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def paligemma(batch: int = 2) -> Architecture:
    processor = _pil("SiglipImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    text = dict(
        model_type="gemma", vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = dict(_CLIP_VISION, model_type="siglip_vision_model", projection_dim=32)
    config = tf.PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, projection_dim=32
    )
    model = tf.PaliGemmaForConditionalGeneration(config)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), 16, batch=batch)
    inputs["token_type_ids"] = (inputs["labels"] != -100).long()
    return Architecture("paligemma", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def mllama(batch: int = 2, open_gates: bool = True) -> Architecture:
    processor = _pil("MllamaImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=2, image_mean=MEAN, image_std=STD
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )  # fmt: skip
    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    model = tf.MllamaForConditionalGeneration(config)
    # The cross-attention gates start at zero (a fresh model's text ignores the image): open them, as training
    # from a released checkpoint finds them.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if open_gates and ("cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name):
                parameter.fill_(1.0)
    pixels = processor(images=[[image] for image in images(batch)], return_tensors="pt")
    inputs = generative_batch(model, {**pixels}, 1, batch=batch)
    tiles = pixels["pixel_values"].shape[2]
    length = inputs["input_ids"].shape[1]
    inputs["cross_attention_mask"] = torch.ones(batch, length, 1, tiles, dtype=torch.long)
    inputs["cross_attention_mask"][..., int(pixels["num_tiles"][0][0]) :] = 0
    inputs.pop("num_tiles", None)
    return Architecture("mllama", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def internvl(batch: int = 2) -> Architecture:
    processor = _pil("GotOcr2ImageProcessor")(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=8,
    )  # fmt: skip
    config = tf.InternVLConfig(
        vision_config=vision, text_config=_llama(model_type="qwen2"), image_token_id=IMAGE_TOKEN
    )
    model = tf.InternVLForConditionalGeneration(config)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), None, batch=batch)
    return Architecture("internvl", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def mistral3(batch: int = 2) -> Architecture:
    processor = _pil("PixtralImageProcessor")(
        size={"longest_edge": IMAGE_SIZE}, patch_size=8, image_mean=MEAN, image_std=STD
    )
    vision = dict(
        model_type="pixtral", hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, head_dim=8,
    )  # fmt: skip
    config = tf.Mistral3Config(
        vision_config=vision, text_config=_llama(model_type="mistral", head_dim=8), image_token_index=IMAGE_TOKEN,
        spatial_merge_size=2,
    )  # fmt: skip
    model = tf.Mistral3ForConditionalGeneration(config)
    inputs = generative_batch(model, processor(images=images(batch), return_tensors="pt"), None, batch=batch)
    return Architecture("mistral3", "channels_first", model, processor, inputs, ["q_proj", "v_proj"])


def _qwen_processor() -> Any:
    return _pil("Qwen2VLImageProcessor")(
        patch_size=8, temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD,
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
    )  # fmt: skip


def qwen2_vl(batch: int = 2) -> Architecture:
    processor = _qwen_processor()
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=32,
        num_heads=4,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text = _llama(
        model_type="qwen2_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}
    )
    config = tf.Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_start_token_id=121
    )
    model = tf.Qwen2VLForConditionalGeneration(config)
    # Images of different sizes: the patch rows of the batch are not a whole number of rows per sample.
    pixels = processor(images=images(batch, sizes=[(32, 32), (32, 48)] * (batch // 2)), return_tensors="pt")
    tokens = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
    inputs = generative_batch(model, pixels, tokens, batch=batch)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_TOKEN).long()
    return Architecture("qwen2_vl", "patch_rows", model, processor, inputs, ["q_proj", "v_proj"])


def qwen3_vl(batch: int = 2) -> Architecture:
    processor = _qwen_processor()
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=37, num_heads=4, patch_size=8, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[0],
    )  # fmt: skip
    text = _llama(
        model_type="qwen3_vl_text",
        head_dim=8,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
    )
    config = tf.Qwen3VLConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_start_token_id=121
    )
    model = tf.Qwen3VLForConditionalGeneration(config)
    pixels = processor(images=images(batch, sizes=[(32, 32), (48, 32)] * (batch // 2)), return_tensors="pt")
    tokens = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
    inputs = generative_batch(model, pixels, tokens, batch=batch)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_TOKEN).long()
    return Architecture("qwen3_vl", "patch_rows", model, processor, inputs, ["q_proj", "v_proj"])


def idefics3(images_per_sample: tuple[int, ...] = (1, 2)) -> Architecture:
    """Samples with 1 and 2 images: the processor pads the first sample with an all-zero image."""
    processor = _pil("Idefics3ImageProcessor")(
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
        image_mean=MEAN, image_std=STD,
    )  # fmt: skip
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    config = tf.Idefics3Config(
        vision_config=vision, text_config=_llama(), image_token_id=IMAGE_TOKEN, scale_factor=2
    )
    model = tf.Idefics3ForConditionalGeneration(config)
    nested, start = [], 0
    pool = images(sum(images_per_sample))
    for count in images_per_sample:
        nested.append(pool[start : start + count])
        start += count
    pixels = processor(images=nested, return_tensors="pt")
    tokens_per_image = (IMAGE_SIZE // 8) ** 2 // 4
    inputs = generative_batch(
        model, pixels, [tokens_per_image * count for count in images_per_sample], batch=len(images_per_sample)
    )

    def padding(batch: dict[str, Any]) -> torch.Tensor:
        return ~batch["pixel_attention_mask"].bool().unsqueeze(-3).expand(batch["pixel_values"].shape)

    return Architecture(
        "idefics3", "channels_first", model, processor, inputs, ["q_proj", "v_proj"], padding=padding
    )


ARCHITECTURES: dict[str, Callable[[], Architecture]] = {
    builder.__name__: builder
    for builder in (
        qwen2_vl, qwen3_vl, siglip2, idefics3, blip_vqa, blip_captioning, blip2, instructblip, llava, llava_next,
        gemma3, paligemma, mllama, internvl, mistral3, clip, siglip, chinese_clip, vit, dinov2, swin, resnet,
        convnext,
    )
}  # fmt: skip
