"""The valid pixel box of a model's normalised inputs, and budgets in [0, 1] pixel units.

Attack budgets are stated in pixel units; models see pixels normalised per channel by an image processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def _as_channel_tuple(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = [value]
    try:
        values = tuple(float(v) for v in value)
    except TypeError as error:
        raise ValueError(f"`{name}` must be a number or a sequence of numbers, got {value!r}.") from error
    if not values:
        raise ValueError(f"`{name}` must not be empty.")
    return values


@dataclass(frozen=True)
class PixelBox:
    """Per-channel normalisation `x = (p - mean) / std` of pixels `p` in [0, 1].

    The methods here read the channel dimension of a pixel tensor at `-3` (`(..., C, H, W)`). A box with one channel
    broadcasts over any number of channels. For a batch in any layout (Qwen patch rows, NaFlex sequences, padded
    image lists), `ran_peft.pixel_layout.BatchPixelBox.place(box, batch)` spreads the box over its elements.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        mean = _as_channel_tuple("mean", self.mean)
        std = _as_channel_tuple("std", self.std)
        if any(s <= 0 for s in std):
            raise ValueError(f"`std` must be positive in every channel, got {std}.")
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise ValueError(f"`mean` has {len(mean)} channels but `std` has {len(std)}: they must match.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_processor(cls, processor: Any) -> PixelBox | None:
        """Read `image_mean` / `image_std` from an image processor or a multi-modal processor.

        Returns None when the object carries no normalisation (the caller decides what that means).
        """
        for candidate in (processor, getattr(processor, "image_processor", None)):
            if candidate is None:
                continue
            mean, std = getattr(candidate, "image_mean", None), getattr(candidate, "image_std", None)
            if mean is None or std is None:
                continue
            return cls._processor_map(candidate, mean, std)
        return None

    @classmethod
    def _processor_map(cls, processor: Any, mean: Any, std: Any) -> PixelBox:
        """The box of the processor's whole affine map from [0, 1] pixels `p` to model values: rescale the 0-255
        values by `rescale_factor` (shifted by -1 with `rescale_offset`, as EfficientNet's processor does), then
        normalise by `image_mean`/`image_std` when `do_normalize` is set (None, as on processors that never
        normalise, means it is not), and by `image_std` once more with EfficientNet's `include_top`."""
        factor = 255.0 * float(getattr(processor, "rescale_factor", 1 / 255) or 1 / 255)
        if getattr(processor, "do_rescale", True) is False:
            factor = 255.0
        offset = 1.0 if getattr(processor, "rescale_offset", False) else 0.0
        if getattr(processor, "do_normalize", True):
            mean, std = _as_channel_tuple("image_mean", mean), _as_channel_tuple("image_std", std)
        else:
            mean, std = (0.0,), (1.0,)
        if getattr(processor, "include_top", False) is True:  # EfficientNet divides by the std once more
            again = _as_channel_tuple("image_std", processor.image_std)
            if len(again) == len(std):
                std = tuple(s * t for s, t in zip(std, again, strict=True))
        if abs(factor - 1.0) < 1e-9 and offset == 0.0:
            return cls(mean, std)
        # x = (p * factor - offset - mean) / std = (p - (mean + offset) / factor) / (std / factor)
        return cls(tuple((m + offset) / factor for m in mean), tuple(s / factor for s in std))

    @property
    def channels(self) -> int:
        """How many channels the mean/std describe (1 for a grey normalisation)."""
        return max(len(self.mean), len(self.std))

    def _vector(self, values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        channels = like.shape[-3] if like.dim() >= 3 else 1
        vector = torch.tensor(values, dtype=torch.float32, device=like.device)
        if vector.numel() == 1:
            vector = vector.expand(channels)
        if vector.numel() != channels:
            raise ValueError(
                f"the pixel box has {vector.numel()} channels but the pixel tensor has {channels} "
                f"(shape {tuple(like.shape)}, channels at dim -3): pass the image processor that made these pixels, or, for "
                "pixels that are not (..., C, H, W) images, place the box over the batch with "
                "`ran_peft.BatchPixelBox.place(box, batch)`."
            )
        return vector.contiguous()

    def std_vector(self, like: torch.Tensor) -> torch.Tensor:
        """The per-channel std as a tensor on `like`'s device, one value per channel of `like`."""
        return self._vector(self.std, like)

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel lower and upper bounds of the valid box in normalised units, shape `[C]`."""
        mean = self._vector(self.mean, like)
        std = self._vector(self.std, like)
        return (0.0 - mean) / std, (1.0 - mean) / std

    def clamp(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised `(..., C, H, W)` values clipped into the valid box, per channel (dtype kept)."""
        lower, upper = self.bounds(pixel_values)
        shape = (-1, 1, 1)
        return torch.maximum(torch.minimum(pixel_values, upper.view(shape)), lower.view(shape)).to(
            pixel_values.dtype
        )

    def to_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised values back to [0, 1] pixel units."""
        mean = self._vector(self.mean, pixel_values).view(-1, 1, 1)
        std = self._vector(self.std, pixel_values).view(-1, 1, 1)
        return pixel_values.float() * std + mean

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels `(..., C, H, W)` to normalised values (the inverse of `to_pixels`)."""
        mean = self._vector(self.mean, pixels).view(-1, 1, 1)
        std = self._vector(self.std, pixels).view(-1, 1, 1)
        return (pixels.float() - mean) / std

    def linf_in_pixels(self, delta: torch.Tensor) -> torch.Tensor:
        """The L-infinity size of a normalised perturbation in pixel units, per sample (leading dims kept)."""
        std = self._vector(self.std, delta).view(-1, 1, 1)
        return (delta.float() * std).abs().flatten(-3).amax(-1)
