"""The image attack of noisy upstream data: targeted PGD under a surrogate vision-language model, pulling an image
towards another row's caption, on the stored 8-bit pixels."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ran_peft.attacks import AttackBudget, attack_mode, deterministic_training_mode, pgd_perturb
from ran_peft.pixel_layout import BatchPixelBox, ChannelsFirstLayout
from ran_peft.pixels import PixelBox

# ----------------------------------------------------------------------------------------------------------------
# Image attack: targeted PGD under a surrogate vision-language model
# ----------------------------------------------------------------------------------------------------------------


def _size_field(size: Any, name: str) -> Any:
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(name)
    return getattr(size, name, None)


def _resample_mode(resample: Any) -> str:
    try:
        code = int(resample)
    except (TypeError, ValueError):
        return "bicubic"
    return {0: "nearest", 2: "bilinear"}.get(code, "bicubic")


@dataclass(frozen=True)
class _Geometry:
    """The resize and centre crop of an image processor, replayed differentiably in torch."""

    height: int | None = None
    width: int | None = None
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, processor: Any) -> _Geometry:
        mode = _resample_mode(getattr(processor, "resample", None))
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop_size = getattr(processor, "crop_size", None)
            crop_h, crop_w = _size_field(crop_size, "height"), _size_field(crop_size, "width")
            if crop_h is None or crop_w is None:
                raise ValueError(f"the image processor center-crops but its crop_size is {crop_size!r}.")
            crop = (int(crop_h), int(crop_w))
        if getattr(processor, "do_resize", True) is False:
            return cls(crop=crop, mode=mode)
        size = getattr(processor, "size", None)
        height, width = _size_field(size, "height"), _size_field(size, "width")
        shortest = _size_field(size, "shortest_edge")
        unsupported = [
            name
            for name in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
            if _size_field(size, name) is not None
        ]
        if height is not None and width is not None and not unsupported:
            return cls(height=int(height), width=int(width), crop=crop, mode=mode)
        if shortest is not None and not unsupported:
            return cls(shortest_edge=int(shortest), crop=crop, mode=mode)
        raise ValueError(
            f"SurrogateVLM replays resizes to a fixed height/width or to a shortest edge; this image processor's "
            f"size is {size!r}. Use a CLIP- or SigLIP-style surrogate."
        )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if self.height is not None and self.width is not None:
            return self.height, self.width
        if self.shortest_edge is not None:
            short, long = (height, width) if height <= width else (width, height)
            new_long = int(self.shortest_edge * long / short)
            return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
        return height, width

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        new_height, new_width = self.resized_shape(height, width)
        if (new_height, new_width) != (height, width):
            smooth = self.mode != "nearest"
            pixels = F.interpolate(
                pixels,
                size=(new_height, new_width),
                mode=self.mode,
                antialias=smooth,
                **({"align_corners": False} if smooth else {}),
            ).clamp(0.0, 1.0)
        if self.crop is not None:
            crop_height, crop_width = self.crop
            height, width = pixels.shape[-2:]
            if crop_height > height or crop_width > width:
                raise ValueError(
                    f"the processor crops {crop_height}x{crop_width} out of a {height}x{width} resized image."
                )
            top, left = (height - crop_height) // 2, (width - crop_width) // 2
            pixels = pixels[..., top : top + crop_height, left : left + crop_width]
        return pixels


def _embedding(output: Any, kind: str) -> torch.Tensor:
    """The embedding tensor of `get_image_features`/`get_text_features`, whether a tensor or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    for name in (f"{kind}_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"get_{kind}_features returned {type(output).__name__} with neither a tensor, `{kind}_embeds` nor "
        "`pooler_output`: SurrogateVLM needs a CLIP/SigLIP-style dual encoder."
    )


class SurrogateVLM:
    """A dual-encoder VLM (CLIP, SigLIP, BiomedCLIP ...) whose embeddings guide the image attack.

    - `model` has `get_image_features(pixel_values=...)` and `get_text_features(input_ids=..., attention_mask=...)`.
    - `image_processor` (or a processor holding one) gives the normalisation (a :class:`PixelBox`) and the resize
      and centre crop, which are replayed differentiably so images are attacked at their own resolution.
    - `tokenizer` maps a list of captions to `input_ids` (and optionally `attention_mask`); a Hugging Face
      tokenizer is called with padding, truncation and `return_tensors="pt"`, any other callable with the list.
    """

    def __init__(self, model: torch.nn.Module, image_processor: Any, tokenizer: Callable[..., Any]):
        processor = getattr(image_processor, "image_processor", None) or image_processor
        box = PixelBox.from_processor(processor)
        if box is None:
            raise ValueError(
                f"the image processor {type(processor).__name__} has no image_mean/image_std: the surrogate needs "
                "them to turn [0, 1] pixels into the model's inputs."
            )
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"the surrogate model {type(model).__name__} has no `{method}`: pass a dual encoder."
                )
        self.model = model
        self.image_processor = processor
        self.tokenizer = tokenizer
        self.box = box
        self.geometry = _Geometry.from_processor(processor)

    @property
    def device(self) -> torch.device:
        """Where the surrogate model's weights are."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The surrogate model's weight dtype."""
        return next(self.model.parameters()).dtype

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` pixels in [0, 1] at any resolution -> the model's normalised `pixel_values` (differentiable)."""
        if pixels.shape[-3] == 1 and self.box.channels > 1:
            pixels = pixels.expand(-1, self.box.channels, -1, -1)
        return self.box.from_pixels(self.geometry.apply(pixels.float()))

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of `[B, C, H, W]` pixels in [0, 1], differentiable with respect to them."""
        pixel_values = self.preprocess(pixels.to(self.device)).to(self.dtype)
        features = _embedding(self.model.get_image_features(pixel_values=pixel_values), "image")
        return F.normalize(features.float(), dim=-1)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions to the surrogate's `input_ids` and `attention_mask`, padded together, on its device."""
        captions = list(captions)
        try:
            from transformers import PreTrainedTokenizerBase
        except ImportError:  # pragma: no cover - transformers is a dependency
            PreTrainedTokenizerBase = ()  # noqa: N806
        if isinstance(self.tokenizer, PreTrainedTokenizerBase):
            encoded = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        else:
            encoded = self.tokenizer(captions)
        if "input_ids" not in encoded:
            raise ValueError(
                f"the surrogate's tokenizer returned {list(encoded)}; it must return `input_ids`."
            )
        return {
            name: torch.as_tensor(encoded[name]).to(self.device)
            for name in ("input_ids", "attention_mask")
            if name in encoded and encoded[name] is not None
        }

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings of captions."""
        features = _embedding(self.model.get_text_features(**self.tokenize(captions)), "text")
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def similarity(self, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its caption, through the image processor itself (not the replay):
        what a model trained on the stored images sees."""
        pixel_values = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with attack_mode(self.model):
            image = _embedding(
                self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)), "image"
            )
            text = self.text_embeddings(captions)
        return (F.normalize(image.float(), dim=-1) * text).sum(-1).cpu()


def _budget_in_levels(epsilon: float) -> int:
    """The L-infinity budget in 8-bit levels: floor(epsilon * 255), tolerant of 8/255 * 255 = 7.999..."""
    return math.floor(epsilon * 255 + 1e-6)


def _fraction_of_255(value: float) -> str:
    return f"{value * 255:.4g}/255"


def _decode_image(stored: Mapping[str, Any]) -> PIL.Image.Image:
    if stored.get("bytes") is not None:
        image = PIL.Image.open(io.BytesIO(stored["bytes"]))
    elif stored.get("path"):
        image = PIL.Image.open(stored["path"])
    else:
        raise ValueError("an image cell holds neither bytes nor a path.")
    image.load()
    return image


def _as_attackable(image: PIL.Image.Image) -> np.ndarray:
    """The image as uint8 `[H, W]` (grey) or `[H, W, 3]` (RGB); other modes are converted to RGB."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _encode_png(levels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(levels, mode="L" if levels.ndim == 2 else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _attack_images(
    images: list[np.ndarray],
    target_captions: list[str],
    surrogate: SurrogateVLM,
    budget: AttackBudget,
) -> list[np.ndarray]:
    """Targeted PGD on each uint8 image towards its target caption; returns uint8 images within the 8-bit budget."""
    results: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, levels in enumerate(images):
        groups.setdefault(levels.shape, []).append(position)
    levels_budget = _budget_in_levels(budget.epsilon)
    for positions in groups.values():
        stacked = np.stack([images[p] for p in positions])
        clean_levels = torch.from_numpy(stacked).to(torch.int16)
        clean_levels = (
            clean_levels.unsqueeze(1) if clean_levels.dim() == 3 else clean_levels.permute(0, 3, 1, 2)
        )
        clean = clean_levels.float().div(255.0).to(surrogate.device)
        target = surrogate.text_embeddings([target_captions[p] for p in positions])

        def objective(adversarial: torch.Tensor, _text: Any, target: torch.Tensor = target) -> torch.Tensor:
            # A sum, so each image's gradient is its own whatever the group size.
            return (surrogate.image_embeddings(adversarial) * target).sum()

        with deterministic_training_mode(surrogate.model):
            # The surrogate's own pixels: [0, 1] channel-first images, whatever layout its processor outputs.
            box = BatchPixelBox.place(PixelBox(), {"pixel_values": clean}, ChannelsFirstLayout())
            adversarial = pgd_perturb(objective, clean, box, budget)
        # Rounding to 8 bits can add half a level: clamp the integer difference back into the budget.
        levels = torch.round(adversarial.detach().cpu().float() * 255.0).to(torch.int16)
        levels = torch.minimum(
            torch.maximum(levels, clean_levels - levels_budget), clean_levels + levels_budget
        )
        levels = levels.clamp(0, 255).to(torch.uint8)
        levels = levels[:, 0] if stacked.ndim == 3 else levels.permute(0, 2, 3, 1)
        for position, attacked in zip(positions, levels.numpy(), strict=True):
            results[position] = np.ascontiguousarray(attacked)
    return results  # type: ignore[return-value]
