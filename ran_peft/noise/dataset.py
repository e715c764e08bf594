"""Noisy upstream data: a copy of an image-caption dataset in which a seeded share of the rows carries adversarial
noise (image, caption or both). Every row records whether and how it was changed."""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np

from ran_peft.attacks import AttackBudget
from ran_peft.noise.captions import _default_matcher, _describe_rewrite, _substitute_terms
from ran_peft.noise.images import (
    SurrogateVLM,
    _as_attackable,
    _attack_images,
    _decode_image,
    _encode_png,
    _fraction_of_255,
)

NOISE_MODES = ("both", "image", "caption")
NOISE_COLUMNS = ("noisy", "noise_kind", "noise_detail", "noise_target_row", "original_caption")

# ----------------------------------------------------------------------------------------------------------------
# The dataset transform
# ----------------------------------------------------------------------------------------------------------------


def noisy_rows(num_rows: int, ratio: float, seed: int = 0) -> list[int]:
    """The sorted rows :func:`add_adversarial_noise` attacks: `round(ratio * num_rows)` of them, chosen by `seed`.

    The choice is the prefix of one seeded permutation, so for a fixed seed a lower ratio's rows are a subset of a
    higher ratio's: noise levels can be compared on the same rows. Python's `round` (half to even) is used.
    """
    count = round(ratio * num_rows)
    permutation = np.random.Generator(np.random.PCG64(seed)).permutation(num_rows)
    return sorted(int(row) for row in permutation[:count])


def _choose_target(row: int, captions: Any, num_rows: int, seed: int, distinct: bool) -> int:
    """Another row for `row`'s image to be pulled towards, with a different caption when the data has one."""
    rng = random.Random(f"{seed}:target:{row}")
    candidate = row
    for _ in range(64):
        candidate = rng.randrange(num_rows - 1)
        candidate += candidate >= row
        if not distinct or captions[candidate] != captions[row]:
            return candidate
    start = rng.randrange(num_rows)
    for offset in range(num_rows):
        other = (start + offset) % num_rows
        if other != row and captions[other] != captions[row]:
            return other
    return candidate


def _check_number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= float(value) <= high:
        raise ValueError(f"`{name}` must be a number in [{low:g}, {high:g}], got {value!r}.")
    return float(value)


def _check_column(dataset: datasets.Dataset, column: str, argument: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(
            f"column {column!r} (`{argument}`) is not in the dataset; available columns: {dataset.column_names}."
        )


def add_adversarial_noise(
    dataset: datasets.Dataset,
    ratio: float,
    *,
    mode: str = "both",
    seed: int = 0,
    surrogate: SurrogateVLM | None = None,
    epsilon: float = 8 / 255,
    steps: int = 10,
    step_size: float | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    rewriter: Callable[[str, random.Random], str] | None = None,
    batch_size: int = 16,
) -> datasets.Dataset:
    """A copy of `dataset` in which exactly `round(ratio * len(dataset))` rows, chosen by `seed`, carry noise.

    - `mode`: "image" (targeted PGD), "caption" (medical term substitution) or "both" (the same rows get both).
    - Image attack: L-infinity PGD (`steps` steps of `step_size`, default `2.5 * epsilon / steps`, no random start)
      that maximises the `surrogate`'s cosine similarity between the image and the caption of another row (chosen
      by `seed`, with a different caption when one exists). The image is attacked at its own resolution, the
      processor's resize and crop being part of the differentiable path; it is stored as a lossless PNG of the same
      size, grey images stay grey (other modes are converted to RGB). Every stored pixel differs from the original
      by at most `floor(epsilon * 255)` 8-bit levels (the rounding to 8 bits is clamped back into the budget).
    - Caption attack: :func:`substitute_medical_terms`, or `rewriter(caption, rng)` when given (e.g. an LLM); the
      rng is seeded per row, so the result does not depend on `batch_size`. A caption holding no known term gets a
      "No" in front; a rewriter that returns the caption unchanged is an error.
    - New columns: `noisy` (bool), `noise_kind` ("none", "image", "caption" or "both"), `noise_detail` (the swaps
      made and the attack's settings), `noise_target_row` (the image attack's target row, -1 without one) and
      `original_caption`. Rows without noise keep their image bytes and caption exactly.
    - Runs as one batched `Dataset.map`, so it streams over datasets larger than memory and caches when the
      dataset lives on disk; the result holds plain columns (`save_to_disk`, `push_to_hub`).
    """
    ratio = _check_number("ratio", ratio, 0.0, 1.0)
    epsilon = _check_number("epsilon", epsilon, 0.0, 1.0)
    if mode not in NOISE_MODES:
        raise ValueError(f"`mode` must be one of {NOISE_MODES}, got {mode!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0, got {steps!r}.")
    if step_size is None:
        step_size = 2.5 * epsilon / max(steps, 1)
    step_size = _check_number("step_size", step_size, 0.0, 1.0)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`dataset` must be a datasets.Dataset, got {type(dataset).__name__}.")
    attack_image = mode in ("image", "both")
    attack_caption = mode in ("caption", "both")
    _check_column(dataset, caption_column, "caption_column")
    if attack_image:
        _check_column(dataset, image_column, "image_column")
        if image_column == caption_column:
            raise ValueError(f"`image_column` and `caption_column` are both {image_column!r}.")
        if not isinstance(dataset.features[image_column], datasets.Image):
            raise ValueError(
                f"column {image_column!r} must hold images (datasets.Image), its feature is "
                f"{dataset.features[image_column]!r}."
            )
        if surrogate is None:
            raise ValueError(
                f"mode={mode!r} attacks images and needs a `surrogate`: "
                "SurrogateVLM(model, image_processor, tokenizer) with a CLIP/SigLIP-style model."
            )
        if not isinstance(surrogate, SurrogateVLM):
            raise TypeError(f"`surrogate` must be a SurrogateVLM, got {type(surrogate).__name__}.")
    taken = [name for name in NOISE_COLUMNS if name in dataset.column_names]
    if taken:
        raise ValueError(f"the dataset already has the noise column(s) {taken}: was it noised before?")
    if rewriter is not None and not callable(rewriter):
        raise TypeError(f"`rewriter` must be callable as rewriter(caption, rng), got {rewriter!r}.")

    num_rows = len(dataset)
    selected = noisy_rows(num_rows, ratio, seed)
    targets: dict[int, int] = {}
    target_captions: dict[int, str] = {}
    if attack_image and selected:
        if num_rows < 2:
            raise ValueError(
                "the image attack pulls each image towards another row's caption: it needs >= 2 rows."
            )
        captions = list(dataset[caption_column])
        distinct = len(set(captions)) > 1
        for row in selected:
            targets[row] = _choose_target(row, captions, num_rows, seed, distinct)
            target_captions[row] = captions[targets[row]]
    budget = AttackBudget(epsilon=epsilon, step_size=step_size, steps=steps, random_start=False)
    image_detail = (
        f"pgd linf eps={_fraction_of_255(epsilon)} steps={steps} step_size={_fraction_of_255(step_size)} "
        f"surrogate={type(surrogate.model).__name__ if surrogate is not None else None}"
    )
    selected_set = frozenset(selected)
    matcher = _default_matcher()

    def noise_batch(captions: list[str], *rest: Any) -> dict[str, list[Any]]:
        images, indices = (rest[0], rest[1]) if attack_image else (None, rest[0])
        new_captions = list(captions)
        noisy, kinds, details, target_rows = [], [], [], []
        attack_positions = []
        for position, row in enumerate(indices):
            chosen = row in selected_set
            noisy.append(chosen)
            kinds.append(mode if chosen else "none")
            target_rows.append(targets.get(row, -1))
            parts = []
            if chosen and attack_image:
                attack_positions.append(position)
                parts.append(f"image: {image_detail} target_row={targets[row]}")
            if chosen and attack_caption:
                new_captions[position], changes = _attack_caption(captions[position], row)
                parts.append("caption: " + "; ".join(changes))
            details.append(" | ".join(parts))
        output: dict[str, list[Any]] = {
            caption_column: new_captions,
            "noisy": noisy,
            "noise_kind": kinds,
            "noise_detail": details,
            "noise_target_row": target_rows,
            "original_caption": list(captions),
        }
        if attack_image:
            new_images = list(images)
            if attack_positions:
                attacked = _attack_images(
                    [_as_attackable(_decode_image(images[p])) for p in attack_positions],
                    [target_captions[indices[p]] for p in attack_positions],
                    surrogate,
                    budget,
                )
                for position, levels in zip(attack_positions, attacked, strict=True):
                    new_images[position] = {"bytes": _encode_png(levels), "path": None}
            output[image_column] = new_images
        return output

    def _attack_caption(caption: Any, row: int) -> tuple[str, list[str]]:
        if not isinstance(caption, str):
            raise ValueError(f"row {row}: the caption to attack is {caption!r}, not a string.")
        rng = random.Random(f"{seed}:caption:{row}")
        if rewriter is None:
            return _substitute_terms(caption, rng, matcher)
        rewritten = rewriter(caption, rng)
        if not isinstance(rewritten, str) or rewritten == caption:
            raise ValueError(
                f"row {row}: the rewriter returned {rewritten!r} for the caption {caption!r}; it must return a "
                "changed string."
            )
        return rewritten, ["rewriter: " + "; ".join(_describe_rewrite(caption, rewritten))]

    working = dataset
    input_columns = [caption_column]
    original_image_feature = None
    if attack_image:
        # Undecoded images pass through byte for byte; only attacked ones are decoded and re-encoded.
        original_image_feature = dataset.features[image_column]
        working = dataset.cast_column(image_column, datasets.Image(decode=False))
        input_columns.append(image_column)
    features = working.features.copy()
    features.update(
        {
            "noisy": datasets.Value("bool"),
            "noise_kind": datasets.Value("string"),
            "noise_detail": datasets.Value("string"),
            "noise_target_row": datasets.Value("int64"),
            "original_caption": datasets.Value("string"),
        }
    )
    noised = working.map(
        noise_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        input_columns=input_columns,
        features=features,
        desc=f"adversarial noise ({mode}, ratio={ratio:g})",
    )
    if original_image_feature is not None:
        noised = noised.cast_column(image_column, original_image_feature)
    return noised
