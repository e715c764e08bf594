"""Rows to model inputs: one text prompt per class, and the collator that batches images, captions and labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ran_peft.data.loaders import _class_caption

# --------------------------------------------------------------------------------------------------------------
# Batches: rows -> tensors
# --------------------------------------------------------------------------------------------------------------


def class_prompts(class_names: Sequence[str], template: str = "A medical image showing {}.") -> list[str]:
    """One text prompt per class, `template` filled with the class name (underscores become spaces)."""
    if isinstance(class_names, str) or not class_names:
        raise ValueError(f"class_names={class_names!r} is not allowed: it must be a non-empty list of names.")
    if template.count("{}") != 1:
        raise ValueError(
            f"template={template!r} is not allowed: it must hold exactly one '{{}}' for the class name."
        )
    return [_class_caption(str(name), template) for name in class_names]


def tokenize_class_prompts(
    tokenizer: Any,
    class_names: Sequence[str],
    *,
    template: str = "A medical image showing {}.",
    max_length: int = 32,
) -> dict[str, torch.Tensor]:
    """The class prompts tokenised and padded together: `input_ids` and `attention_mask`, one row per class.

    This is the `class_text_inputs` a dual encoder needs to be trained or evaluated as a prompt classifier.
    """
    encoded = tokenizer(
        class_prompts(class_names, template),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    input_ids = encoded["input_ids"]
    attention_mask = encoded.get("attention_mask")
    if attention_mask is None:  # some tokenizers (e.g. SigLIP's) return no mask by default
        attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


_COLLATOR_MODES = ("classification", "contrastive")


class ImageTextCollator:
    """Turn a list of rows (`image`, `caption`, `label`) into a batch of tensors for a `DataLoader` or `Trainer`.

    Always `pixel_values` (from the image processor); in "classification" mode `labels` (from `label`); in
    "contrastive" mode `input_ids` and `attention_mask` of the captions (padded to the longest, truncated to
    `max_length`). With `transformers.Trainer`, set `remove_unused_columns=False` so the rows keep `image` and
    `caption` until they reach the collator.

    Args:
        processor_or_image_processor: an image processor, or a multi-modal processor (e.g. `CLIPProcessor`)
            whose `image_processor` and `tokenizer` are used.
        tokenizer: the caption tokenizer; default: the processor's. Needed in "contrastive" mode.
        mode: "classification" or "contrastive".
        max_length: longest caption in tokens (special tokens included).
    """

    def __init__(
        self,
        processor_or_image_processor: Any,
        tokenizer: Any | None = None,
        *,
        mode: str = "classification",
        max_length: int = 32,
    ) -> None:
        if mode not in _COLLATOR_MODES:
            raise ValueError(f"mode={mode!r} is not allowed: it must be one of {list(_COLLATOR_MODES)}.")
        if max_length < 1:
            raise ValueError(f"max_length={max_length} is not allowed: it must be >= 1.")
        self.image_processor = (
            getattr(processor_or_image_processor, "image_processor", None) or processor_or_image_processor
        )
        if not callable(self.image_processor):
            raise ValueError(
                f"processor_or_image_processor={processor_or_image_processor!r} is not an image processor: it must be "
                "callable on images, or have an `image_processor` that is."
            )
        self.tokenizer = (
            tokenizer if tokenizer is not None else getattr(processor_or_image_processor, "tokenizer", None)
        )
        if mode == "contrastive" and self.tokenizer is None:
            raise ValueError(
                "mode='contrastive' needs a tokenizer for the captions: pass tokenizer=..., or a processor that has one."
            )
        self.mode = mode
        self.max_length = max_length

    def _column(self, rows: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
        for index, row in enumerate(rows):
            if key not in row:
                raise ValueError(
                    f"row {index} has no {key!r}: ImageTextCollator(mode={self.mode!r}) needs it; the row has "
                    f"{sorted(row)}. With transformers.Trainer, set remove_unused_columns=False."
                )
        return [row[key] for row in rows]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch of `rows`: `pixel_values`, and `labels` or `input_ids`/`attention_mask` by mode."""
        if not rows:
            raise ValueError("ImageTextCollator got an empty list of rows.")
        images = []
        for index, image in enumerate(self._column(rows, "image")):
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if not isinstance(image, Image.Image):
                raise ValueError(
                    f"row {index}: 'image' is a {type(image).__name__}; it must be a PIL image or a uint8 array "
                    "(a datasets Image feature with decode=True gives PIL images)."
                )
            images.append(image.convert("RGB"))
        batch = {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
        if self.mode == "classification":
            batch["labels"] = torch.tensor(
                [int(label) for label in self._column(rows, "label")], dtype=torch.long
            )
            return batch
        captions = [str(caption) for caption in self._column(rows, "caption")]
        encoded = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch["input_ids"] = encoded["input_ids"]
        attention_mask = encoded.get("attention_mask")
        batch["attention_mask"] = (
            attention_mask if attention_mask is not None else torch.ones_like(encoded["input_ids"])
        )
        return batch
