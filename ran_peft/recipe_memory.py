"""What a light-weight RAN recipe keeps from one step to the next: each sample's last perturbation (carried across
epochs, ATTA-style) and the batch that Free adversarial training replays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ran_peft.pixel_layout import BatchPixelBox


@dataclass(eq=False)
class Replay:
    """The batch Free AT replays: its inputs, clean pixels and placement, the perturbation so far, the pixels of the
    last replay (whose `.grad` the step's backward fills) and the clean replay's predictions for the KL."""

    inputs: dict[str, Any]
    extra: dict[str, Any]
    share: float
    placed: BatchPixelBox
    clean_pixels: torch.Tensor
    delta: torch.Tensor
    last_pixels: torch.Tensor
    clean_logits: torch.Tensor | None
    kl_rows: torch.Tensor | None
    remaining: int


@dataclass(eq=False)
class RecipeMemory:
    """Kept across the steps of one training run (`RANTrainingWrapper` holds one; a plain loop passes its own to
    `ran_loss(..., memory=...)`).

    `perturbations` maps a sample's key (a hash of its clean pixels) to its last perturbation, in the model's pixel
    units, in half precision on the CPU.
    """

    perturbations: dict[bytes, torch.Tensor] = field(default_factory=dict)
    replay: Replay | None = None

    @staticmethod
    def sample_keys(pixel_values: torch.Tensor) -> list[bytes]:
        """One key per sample (first axis) of `pixel_values`: a hash of its bytes, so a sample is recognised
        whenever it comes back, in whatever batch and order."""
        rows = pixel_values.detach().to("cpu", torch.float32).contiguous()
        return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in rows]

    def recall(self, keys: list[bytes], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept perturbations of `keys`, stacked like `like` (zeros where none is kept), and which were kept."""
        found = torch.tensor([key in self.perturbations for key in keys], dtype=torch.bool)
        stacked = torch.zeros_like(like)
        for index, key in enumerate(keys):
            if found[index]:
                stacked[index] = self.perturbations[key].to(like.device, like.dtype)
        return stacked, found.to(like.device)

    def remember(self, keys: list[bytes], delta: torch.Tensor) -> None:
        """Keep each sample's perturbation (rows of `delta`) under its key."""
        kept = delta.detach().to("cpu", torch.float16)
        for index, key in enumerate(keys):
            self.perturbations[key] = kept[index].clone()
