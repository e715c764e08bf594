"""Noisy upstream data: a copy of an image-caption dataset in which a seeded share of the rows carries adversarial
noise (targeted PGD on the image under a surrogate VLM, meaning-changing medical term swaps in the caption).

RAN's premise is that upstream (pre-training) data holds such noise; this module makes it on purpose, so the effect
of the noise level can be measured. Every row records whether and how it was changed.
"""

from __future__ import annotations

import difflib
import io
import math
import numbers
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ran_peft.attacks import AttackBudget, attack_mode, pgd_perturb
from ran_peft.pixel_layout import BatchPixelBox, ChannelsFirstLayout
from ran_peft.pixels import PixelBox

NOISE_MODES = ("both", "image", "caption")
NOISE_COLUMNS = ("noisy", "noise_kind", "noise_detail", "noise_target_row", "original_caption")

# Interchangeable terms: a term found in a caption is replaced by another member of its group, which keeps the
# sentence fluent but changes what it asserts. Canonical spelling here; matching ignores case.
MEDICAL_TERM_GROUPS: dict[str, tuple[str, ...]] = {
    "laterality": ("left", "right"),
    "vertical_position": ("upper", "lower"),
    "organ": ("lung", "liver", "kidney", "brain", "spleen", "pancreas", "heart", "thyroid", "bladder"),
    "organ_plural": ("lungs", "kidneys"),
    "organ_adjective": ("pulmonary", "hepatic", "renal", "cerebral", "cardiac", "splenic"),
    "joint": ("knee", "shoulder", "hip", "elbow", "ankle", "wrist"),
    "region": ("chest", "abdomen", "pelvis"),
    "modality": ("CT", "MRI", "X-ray", "ultrasound", "PET"),
    "focal_finding": ("nodule", "mass", "cyst", "lesion", "tumor", "abscess", "calcification"),
    "focal_finding_plural": ("nodules", "masses", "cysts", "lesions", "tumors", "calcifications"),
    "diffuse_finding": ("effusion", "hemorrhage", "consolidation", "pneumothorax", "edema", "atelectasis"),
    "bone_finding": ("fracture", "dislocation", "erosion"),
    "severity": ("mild", "moderate", "severe"),
    "size_word": ("small", "large"),
}

# Negation flips, phrase -> replacement (an empty replacement deletes the phrase). Longer phrases win over shorter
# ones at the same place, so "there is no" is flipped as a whole rather than as a bare "no".
NEGATION_SWAPS: dict[str, str] = {
    "shows no": "shows a",
    "shows a": "shows no",
    "shows an": "shows no",
    "there is no": "there is a",
    "there is a": "there is no",
    "there is an": "there is no",
    "no evidence of": "evidence of",
    "without": "with",
    "with": "without",
    "no": "",
}

# "with" is not negated after these words: "consistent without" is not English.
NEGATION_BLOCKED_AFTER: dict[str, tuple[str, ...]] = {
    "with": ("consistent", "compatible", "associated", "keeping", "along", "together", "filled", "treated"),
}

SIZE_FACTORS = (0.5, 2.0, 3.0)
_SIZE_UNITS = {"mm": "cm", "cm": "mm"}
# Prefixed to a caption holding no known term, so that every attacked caption still changes what it asserts.
FALLBACK_NEGATION = "No"


# ----------------------------------------------------------------------------------------------------------------
# Caption attack: medical term substitution
# ----------------------------------------------------------------------------------------------------------------


class _TermMatcher:
    """One compiled regex over a vocabulary's terms, negation phrases and sizes (`12 mm`, `1.5cm`)."""

    def __init__(self, term_groups: Mapping[str, Sequence[str]], negation_swaps: Mapping[str, str]):
        self.canonical: dict[str, str] = {}
        self.alternatives: dict[str, tuple[str, ...]] = {}
        for group, terms in term_groups.items():
            if len(terms) < 2:
                raise ValueError(
                    f"term group {group!r} needs at least two terms to swap between, got {terms!r}."
                )
            for term in terms:
                key = _normalise(term)
                if key in self.canonical or key in negation_swaps:
                    raise ValueError(f"term {term!r} appears twice in the vocabulary (group {group!r}).")
                self.canonical[key] = term
                self.alternatives[key] = tuple(other for other in terms if _normalise(other) != key)
        self.negations = {_normalise(phrase): replacement for phrase, replacement in negation_swaps.items()}
        phrases = sorted([*self.canonical, *self.negations], key=len, reverse=True)
        alternation = "|".join(self._phrase_pattern(phrase) for phrase in phrases)
        self.pattern = re.compile(
            r"(?<![\w.])(?P<number>\d+(?:\.\d+)?)(?P<gap>\s?)(?P<unit>mm|cm)(?!\w)"
            + (rf"|(?<![\w-])(?P<term>{alternation})(?![\w-])" if alternation else ""),
            re.IGNORECASE,
        )

    @staticmethod
    def _phrase_pattern(phrase: str) -> str:
        blocked = "".join(rf"(?<!{re.escape(word)}\s)" for word in NEGATION_BLOCKED_AFTER.get(phrase, ()))
        return blocked + r"\s+".join(re.escape(word) for word in phrase.split())


def _normalise(phrase: str) -> str:
    return " ".join(phrase.lower().split())


_DEFAULT_MATCHER: _TermMatcher | None = None


def _default_matcher() -> _TermMatcher:
    global _DEFAULT_MATCHER
    if _DEFAULT_MATCHER is None:
        _DEFAULT_MATCHER = _TermMatcher(MEDICAL_TERM_GROUPS, NEGATION_SWAPS)
    return _DEFAULT_MATCHER


def _styled(matched: str, canonical: str, replacement: str, sentence_start: bool) -> str:
    """`replacement` written in the case style of `matched` ("LEFT" -> "RIGHT", "Left" -> "Right")."""
    if not replacement:
        return replacement
    letters = [c for c in matched if c.isalpha()]
    if matched != canonical and len(letters) >= 2 and all(c.isupper() for c in letters):
        return replacement.upper()
    # A canonical acronym ("CT") says nothing about case unless it opens a sentence.
    if matched[:1].isupper() and (matched != canonical or sentence_start):
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _indefinite_article(word: str) -> str:
    """'a' or 'an' before `word`, by how it is spoken ("an MRI", "an X-ray", "a CT", "an 8 mm", "a unilateral")."""
    if not word:
        return "a"
    if word[0].isdigit():
        integer = re.match(r"\d+", word).group()
        return "an" if integer.startswith("8") or integer in ("11", "18") else "a"
    acronym = len(word) >= 2 and (word[:2].isupper() or word[1] == "-")
    if acronym:
        return "an" if word[0].upper() in "AEFHILMNORSX" else "a"
    lowered = word.lower()
    if lowered[0] in "aeio" or (
        lowered[0] == "u" and not lowered.startswith(("uni", "use", "usu", "ure", "uro"))
    ):
        return "an"
    return "a"


def _with_article(article: str, like: str) -> str:
    return (
        article.upper()
        if like.isupper() and len(like) > 1
        else (article.capitalize() if like[:1].isupper() else article)
    )


_TRAILING_ARTICLE = re.compile(r"(?<!\w)(a|an)(\s+)$", re.IGNORECASE)
_LEADING_ARTICLE = re.compile(r"(?<!\w)(a|an)$", re.IGNORECASE)


def _new_size(number: str, unit: str, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return number, _SIZE_UNITS[unit.lower()] if unit.islower() else _SIZE_UNITS[unit.lower()].upper()
    value = float(number)
    decimals = len(number.split(".")[1]) if "." in number else 0
    for factor in rng.sample(SIZE_FACTORS, len(SIZE_FACTORS)):
        scaled = round(value * factor, decimals)
        text = f"{scaled:.{decimals}f}" if decimals else str(max(1, int(scaled)))
        if text != number:
            return text, unit
    return number, _SIZE_UNITS[unit.lower()]


def _substitute_terms(caption: str, rng: random.Random, matcher: _TermMatcher) -> tuple[str, list[str]]:
    """The caption with a random non-empty subset of its known terms swapped, and the list of swaps made."""
    matches = list(matcher.pattern.finditer(caption))
    if not matches:
        return _fallback_negation(caption)
    chosen = [match for match in matches if rng.random() < 0.5]
    if not chosen:
        chosen = [rng.choice(matches)]
    pieces: list[str] = []
    changes: list[str] = []
    position = 0
    capitalise_next = False
    for match in chosen:
        start, end = match.span()
        untouched = caption[position:start]
        if capitalise_next and untouched:
            untouched, capitalise_next = untouched[:1].upper() + untouched[1:], False
        pieces.append(untouched)
        matched = match.group()
        written = "".join(pieces).rstrip()
        sentence_start = not written or written[-1] in ".!?"
        if match.group("number") is not None:
            number, unit = _new_size(match.group("number"), match.group("unit"), rng)
            replacement = f"{number}{match.group('gap')}{unit}"
        else:
            key = _normalise(matched)
            if key in matcher.negations:
                replacement = _styled(matched, key, matcher.negations[key], sentence_start)
                if not replacement:
                    # Deleting "no": drop the space after it, and keep the sentence capitalised.
                    end += len(caption[end:]) - len(caption[end:].lstrip())
                    capitalise_next = matched[:1].isupper()
                else:
                    replacement = _fix_inner_article(replacement, caption[end:])
            else:
                canonical = matcher.canonical[key]
                replacement = _styled(
                    matched, canonical, rng.choice(matcher.alternatives[key]), sentence_start
                )
        swapped_term = match.group("number") is not None or _normalise(matched) not in matcher.negations
        if replacement and swapped_term:
            _fix_preceding_article(pieces, replacement)
        if capitalise_next and replacement:
            replacement, capitalise_next = replacement[:1].upper() + replacement[1:], False
        pieces.append(replacement)
        changes.append(f"{matched}->{replacement or '(deleted)'}")
        position = end
    rest = caption[position:]
    if capitalise_next:
        rest = rest[:1].upper() + rest[1:]
    pieces.append(rest)
    return "".join(pieces), changes


def _fix_preceding_article(pieces: list[str], replacement: str) -> None:
    """Make an "a"/"an" right before a swapped term agree with the new term ("a mass" -> "an effusion")."""
    written = "".join(pieces)
    found = _TRAILING_ARTICLE.search(written)
    if found is None:
        return
    article = _with_article(_indefinite_article(replacement), found.group(1))
    pieces[:] = [written[: found.start()] + article + found.group(2)]


def _fix_inner_article(replacement: str, following: str) -> str:
    """A negation flip that ends in an article ("shows a") agrees with the next word ("shows an effusion")."""
    found = _LEADING_ARTICLE.search(replacement)
    next_word = re.match(r"\s*([\w-]+)", following)
    if found is None or next_word is None:
        return replacement
    return replacement[: found.start()] + _with_article(
        _indefinite_article(next_word.group(1)), found.group(1)
    )


def _fallback_negation(caption: str) -> tuple[str, list[str]]:
    stripped = caption.lstrip()
    if not stripped:
        raise ValueError("cannot attack an empty caption: there is no statement to change.")
    first = stripped.split()[0]
    # Lower-case the old first word unless it is an acronym ("CT", "MRI") or a single letter.
    if not (len(first) > 1 and first[:2].isupper()):
        stripped = stripped[:1].lower() + stripped[1:]
    return f"{caption[: len(caption) - len(caption.lstrip())]}{FALLBACK_NEGATION} {stripped}", [
        f"(no known term)->{FALLBACK_NEGATION}"
    ]


def substitute_medical_terms(
    caption: str,
    rng: random.Random,
    *,
    term_groups: Mapping[str, Sequence[str]] | None = None,
    negation_swaps: Mapping[str, str] | None = None,
) -> str:
    """Change what a caption asserts by swapping medical terms for others of the same kind.

    Each known term (laterality, anatomy, modality, finding, severity), negation phrase and size (`12 mm`) is
    swapped with probability 1/2, and at least one always is; matches are whole words, ignore case, and the
    replacement keeps the original's case ("Left" -> "Right", "LEFT" -> "RIGHT"). A neighbouring "a"/"an" is made
    to agree. A caption holding no known term gets the negation "No" in front. Deterministic given `rng`'s state.
    Usable as the `rewriter` of :func:`add_adversarial_noise` (e.g. with `functools.partial` and a vocabulary of
    your own: `term_groups` like :data:`MEDICAL_TERM_GROUPS`, `negation_swaps` like :data:`NEGATION_SWAPS`).
    """
    if term_groups is None and negation_swaps is None:
        matcher = _default_matcher()
    else:
        matcher = _TermMatcher(
            MEDICAL_TERM_GROUPS if term_groups is None else term_groups,
            NEGATION_SWAPS if negation_swaps is None else negation_swaps,
        )
    return _substitute_terms(caption, rng, matcher)[0]


def _describe_rewrite(before: str, after: str) -> list[str]:
    """Word-level edits between two captions, as "old->new" items (for rewriters that report nothing)."""
    old, new = before.split(), after.split()
    changes = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag != "equal":
            changes.append(f"{' '.join(old[i1:i2]) or '(inserted)'}->{' '.join(new[j1:j2]) or '(deleted)'}")
    return changes or ["whitespace changed"]


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
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
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

        with attack_mode(surrogate.model):
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
