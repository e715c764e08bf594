"""open_clip models (BiomedCLIP and other `open_clip.create_model(...)` dual encoders) as a RAN model family.

The model is trained as it is: `get_peft_model(open_clip_model, RANConfig(...))` needs no wrapper, so the saved
adapter's keys are the bare model's and stock peft loads it back onto `open_clip.create_model(...)`. Batches use the
Trainer's names (`pixel_values`, `input_ids` captions, or `labels` with class prompts); the family feeds them to
`forward(image=..., text=...)`. The pixel normalisation is read from the model's own `visual.preprocess_cfg`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ran_peft.families import (
    DualEncoderFamily,
    FamilyDetector,
    FamilyOutput,
    register_family_detector,
    unwrap_model,
)
from ran_peft.pixels import PixelBox

# How a Hub id is written for open_clip (`open_clip.create_model_and_transforms("hf-hub:owner/name")`).
HUB_PREFIX = "hf-hub:"


def _preprocess_config(model: nn.Module) -> Mapping[str, Any] | None:
    visual = getattr(model, "visual", None)
    config = getattr(visual, "preprocess_cfg", None)
    return config if isinstance(config, Mapping) else None


def looks_like_open_clip(model: nn.Module) -> bool:
    """Whether the model has open_clip's dual-encoder interface (`encode_image`, `encode_text`, `logit_scale`)."""
    return (
        callable(getattr(model, "encode_image", None))
        and callable(getattr(model, "encode_text", None))
        and isinstance(getattr(model, "logit_scale", None), torch.Tensor)
    )


def is_open_clip_model(model: nn.Module) -> bool:
    """An open_clip dual encoder RAN can train: its interface plus the preprocessing config on `model.visual`."""
    return looks_like_open_clip(model) and _preprocess_config(model) is not None


def open_clip_pixel_box(model: nn.Module) -> PixelBox | None:
    """The pixel normalisation of an open_clip model, from its own `visual.preprocess_cfg` (mean/std)."""
    config = _preprocess_config(unwrap_model(model))
    if config is None or config.get("mean") is None or config.get("std") is None:
        return None
    return PixelBox(tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]))


def _outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(image features, text features, logit scale, logit bias) from open_clip's dict or tuple output."""
    if isinstance(outputs, Mapping):
        return (
            outputs["image_features"],
            outputs["text_features"],
            outputs["logit_scale"],
            outputs.get("logit_bias"),
        )
    image, text, scale, *bias = outputs
    return image, text, scale, (bias[0] if bias else None)


class OpenCLIPFamily(DualEncoderFamily):
    """open_clip dual encoders: open_clip's own contrastive loss (`ClipLoss`, or `SigLipLoss` for models with a
    logit bias) on image-caption batches, or cross-entropy over image-to-prompt logits with `labels` and class
    prompts. Features are the (normalised) image embeddings `encode_image` gives."""

    name = "open_clip"
    routes_every_call = True  # the model's forward takes `image`/`text`, not the Trainer's `pixel_values`

    def image_features(self, model, inputs, pixel_values):
        """open_clip's image tower alone: `encode_image` (unnormalised embeddings)."""
        return unwrap_model(model).encode_image(pixel_values).float()

    def run(self, forward, inputs, pixel_values, *, want_features=False, extra=None):
        extra = dict(extra or {})
        num_items_in_batch = extra.pop("num_items_in_batch", None)
        labels = inputs.get("labels")
        device = pixel_values.device
        text = (self._class_prompts(inputs)["input_ids"] if labels is not None else inputs["input_ids"]).to(
            device
        )
        image, text_features, scale, bias = _outputs(forward(image=pixel_values, text=text, **extra))
        logits = scale * image.float() @ text_features.float().t()
        if bias is not None:
            logits = logits + bias
        if labels is not None:
            reduction = "sum" if num_items_in_batch else "mean"
            loss = F.cross_entropy(logits, labels.to(device), reduction=reduction)
            if num_items_in_batch:  # the Trainer's gradient-accumulation contract: a sum over the whole batch
                loss = loss / num_items_in_batch
        else:
            from open_clip.loss import ClipLoss, SigLipLoss

            loss_function = SigLipLoss() if bias is not None else ClipLoss()
            arguments = (
                (image, text_features, scale, bias) if bias is not None else (image, text_features, scale)
            )
            loss = loss_function(*arguments)
        features = image.float() if want_features else None
        return FamilyOutput(loss, logits, None, features)


def unsupported_open_clip_reason(model: nn.Module) -> str | None:
    """Why a model that looks like open_clip cannot be trained (None when it can, or is not open_clip-like)."""
    if looks_like_open_clip(model) and _preprocess_config(model) is None:
        return (
            f"{type(model).__name__} has open_clip's interface (encode_image, encode_text, logit_scale) but no "
            "preprocessing config on `model.visual.preprocess_cfg`: create it with `open_clip.create_model(...)` "
            "(or `open_clip.set_model_preprocess_cfg(model, {...})`), so RAN knows its pixel normalisation."
        )
    return None


def _detect_open_clip(
    model: nn.Module, class_text_inputs: Mapping[str, torch.Tensor] | None
) -> OpenCLIPFamily | None:
    return OpenCLIPFamily(class_text_inputs) if is_open_clip_model(model) else None


# `detect_family` asks this before reading the forward signature (an open_clip forward takes `image`, `text`).
register_family_detector(FamilyDetector("open_clip", _detect_open_clip, unsupported_open_clip_reason))


# How open_clip names a model to load: a Hub repo (`hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`)
# or a local folder laid out like one (`open_clip_config.json` + weights).
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def is_open_clip_name(name: str | None) -> bool:
    """Whether `name` is an open_clip model name (`hf-hub:...` or `local-dir:...`)."""
    return bool(name) and name.startswith(OPEN_CLIP_SCHEMAS)


class OpenCLIPImageProcessor:
    """open_clip's own preprocessing transform behind the call RAN's collators make on an image processor
    (`processor(images=[...], return_tensors="pt")["pixel_values"]`); `image_mean`/`image_std` are the model's."""

    def __init__(self, transform: Any, preprocess_cfg: Mapping[str, Any]):
        self.transform = transform
        self.image_mean = [float(v) for v in preprocess_cfg["mean"]]
        self.image_std = [float(v) for v in preprocess_cfg["std"]]

    def __call__(self, images: Any, return_tensors: str = "pt", **kwargs: Any) -> dict[str, torch.Tensor]:
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}


class OpenCLIPTextTokenizer:
    """open_clip's tokenizer behind the call RAN's collators make on a tokenizer: `input_ids` at the model's
    context length (open_clip pads and truncates itself)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, texts: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return {"input_ids": self.tokenizer(texts)}


class OpenCLIPProcessor:
    """An open_clip model's preprocessing and tokenizer, shaped like a transformers processor."""

    def __init__(self, image_processor: OpenCLIPImageProcessor, tokenizer: OpenCLIPTextTokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer


def load_open_clip(name: str) -> tuple[nn.Module, OpenCLIPProcessor]:
    """`open_clip.create_model_and_transforms(name)` and `open_clip.get_tokenizer(name)`, as (model, processor).

    `name` is what open_clip takes, e.g. `hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`. The
    model is the bare open_clip model: `get_peft_model(model, RANConfig(...))` and stock peft reload it as it is.
    """
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"{name!r} is an open_clip model: `pip install 'ran-peft[open_clip]'` (open_clip imports torchvision, "
            "which must match your torch)."
        ) from error
    model, _, transform = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    processor = OpenCLIPProcessor(
        OpenCLIPImageProcessor(transform, _preprocess_config(model)), OpenCLIPTextTokenizer(tokenizer)
    )
    return model, processor
