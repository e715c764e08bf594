"""Medical image-caption data with one set of columns (`image`, `caption`, `label`, metadata): a procedural
*synthetic* benchmark, loaders for image folders, DICOM folders and Hub datasets, and the batch collator.
"""

from __future__ import annotations

import io
import logging
import math
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# The synthetic benchmark: vocabulary of the metadata
# --------------------------------------------------------------------------------------------------------------

MODALITIES = ("CT", "MRI", "X-ray", "ultrasound")
ANATOMIES = ("chest", "brain", "liver", "kidney", "knee")
FINDINGS = ("normal", "nodule", "mass", "effusion", "cyst")
LATERALITIES = ("left", "right", "none")
SYNTHETIC_TASKS: dict[str, tuple[str, ...]] = {
    "finding": FINDINGS,
    "modality": MODALITIES,
    "anatomy": ANATOMIES,
    "laterality": LATERALITIES,
}

# Lesion size (diameter; for an effusion, the depth of the fluid) in mm, inclusive.
_SIZE_RANGE_MM = {"nodule": (14, 28), "mass": (36, 72), "effusion": (24, 64), "cyst": (18, 44)}
# Field of view across the image (mm) at scale 1: turns millimetres into image units.
_FIELD_OF_VIEW_MM = {"chest": 300.0, "brain": 200.0, "liver": 320.0, "kidney": 320.0, "knee": 280.0}
_ANATOMY_PHRASE = {"chest": "chest", "brain": "brain", "liver": "liver", "kidney": "kidneys", "knee": "knees"}
_NORMAL_NEGATIVE = {
    "chest": "consolidation",
    "brain": "hemorrhage",
    "liver": "lesion",
    "kidney": "hydronephrosis",
    "knee": "fracture",
}
# Where a lesion is, by anatomy: [upper/anterior phrase, lower/posterior phrase]; `{side}` is "right"/"left".
_LESION_LOCATIONS = {
    "chest": ("in the {side} upper lobe", "in the {side} lower lobe"),
    "brain": ("in the {side} frontal lobe", "in the {side} occipital lobe"),
    "liver": ("in the anterior {side} hepatic lobe", "in the posterior {side} hepatic lobe"),
    "kidney": ("in the upper pole of the {side} kidney", "in the lower pole of the {side} kidney"),
    "knee": ("in the anterior {side} knee", "in the posterior {side} knee"),
}
_EFFUSION_LOCATIONS = {
    "chest": "at the {side} lung base",
    "brain": "over the {side} hemisphere",
    "liver": "around the {side} hepatic lobe",
    "kidney": "around the {side} kidney",
    "knee": "in the {side} knee joint",
}
_ABNORMAL_TEMPLATES = (
    "{Modality} of the {anatomy} shows {article} {size} mm {finding} {location}.",
    "{Modality} of the {anatomy}: {size} mm {finding} {location}.",
    "{Finding} {location} measuring {size} mm on {modality} of the {anatomy}.",
)
_NORMAL_TEMPLATES = (
    "{Modality} of the {anatomy} is normal.",
    "{Modality} of the {anatomy}: normal study, no acute {negative}.",
    "Normal {modality} of the {anatomy}.",
)
_SYNTHETIC_CHUNK = 256  # rows per random stream: fixes which rows share a stream, so prefixes are stable


def _modality_phrase(modality: str, axial: bool, capitalize: bool) -> str:
    phrase = f"axial {modality}" if axial and modality in ("CT", "MRI") else modality
    return phrase[0].upper() + phrase[1:] if capitalize else phrase


def _indefinite_article(size_mm: int) -> str:
    # Said aloud: "an 8 mm", "an 11 mm", "an 18 mm", "an 80 mm"; every other size under 100 takes "a".
    return "an" if str(size_mm).startswith("8") or size_mm in (11, 18) else "a"


def _synthetic_caption(
    modality: str,
    anatomy: str,
    finding: str,
    laterality: str,
    size_mm: int,
    region: int,
    template: int,
    axial: bool,
) -> str:
    if finding == "normal":
        text = _NORMAL_TEMPLATES[template % len(_NORMAL_TEMPLATES)]
        return text.format(
            Modality=_modality_phrase(modality, axial, capitalize=True),
            modality=_modality_phrase(modality, axial, capitalize=False),
            anatomy=_ANATOMY_PHRASE[anatomy],
            negative=_NORMAL_NEGATIVE[anatomy],
        )
    if finding == "effusion":
        location = _EFFUSION_LOCATIONS[anatomy].format(side=laterality)
    else:
        location = _LESION_LOCATIONS[anatomy][region].format(side=laterality)
    text = _ABNORMAL_TEMPLATES[template % len(_ABNORMAL_TEMPLATES)]
    return text.format(
        Modality=_modality_phrase(modality, axial, capitalize=True),
        modality=_modality_phrase(modality, axial, capitalize=False),
        anatomy=_ANATOMY_PHRASE[anatomy],
        article=_indefinite_article(size_mm),
        size=size_mm,
        finding=finding,
        Finding=finding.capitalize(),
        location=location,
    )


def synthetic_caption_texts() -> Iterator[str]:
    """Texts holding every word a synthetic caption can contain (each template, phrase and number once)."""
    for modality in MODALITIES:
        for anatomy in ANATOMIES:
            for axial in (False, True):
                for template in range(max(len(_ABNORMAL_TEMPLATES), len(_NORMAL_TEMPLATES))):
                    yield _synthetic_caption(modality, anatomy, "normal", "none", 0, 0, template, axial)
                    for finding in FINDINGS[1:]:
                        for laterality in ("left", "right"):
                            for region in (0, 1):
                                args = (modality, anatomy, finding, laterality, 8, region, template, axial)
                                yield _synthetic_caption(*args)
                                yield _synthetic_caption(*args[:4], 12, *args[5:])
    largest = max(high for _, high in _SIZE_RANGE_MM.values())
    yield " ".join(str(size) for size in range(largest + 1))


# --------------------------------------------------------------------------------------------------------------
# The synthetic benchmark: drawing the cases (everything a caption states, and where the lesion is)
# --------------------------------------------------------------------------------------------------------------

# Centre and half-extent (cx, cy, rx, ry) of where a lesion may sit, in anatomy units ([-1, 1] across the
# image, y pointing down = posterior for axial views). Radiological convention: the patient's right is on the
# image's left, so "right" regions have negative x.
_LESION_REGIONS = {
    "chest": {"right": (-0.40, 0.0, 0.12, 0.28), "left": (0.40, 0.0, 0.12, 0.28)},
    "brain": {"right": (-0.28, 0.0, 0.12, 0.45), "left": (0.28, 0.0, 0.12, 0.45)},
    "liver": {"right": (-0.40, -0.02, 0.12, 0.24), "left": (0.02, -0.16, 0.06, 0.10)},
    "kidney": {"right": (-0.42, 0.22, 0.04, 0.13), "left": (0.42, 0.22, 0.04, 0.13)},
    "knee": {"right": (-0.45, 0.0, 0.10, 0.28), "left": (0.45, 0.0, 0.10, 0.28)},
}


def _draw_cases(rng: np.random.Generator, count: int, task: str) -> dict[str, np.ndarray]:
    """Metadata and lesion geometry of `count` cases; the task's label is balanced within the chunk."""
    balanced = rng.permutation(np.arange(count) % len(SYNTHETIC_TASKS[task]))
    modality = balanced if task == "modality" else rng.integers(0, len(MODALITIES), count)
    anatomy = balanced if task == "anatomy" else rng.integers(0, len(ANATOMIES), count)
    side = rng.integers(0, 2, count)  # 0 = left, 1 = right (indices into LATERALITIES)
    if task == "laterality":
        # "none" is a normal study; a left or right case has one of the four lesions.
        laterality = balanced
        finding = np.where(laterality == 2, 0, rng.integers(1, len(FINDINGS), count))
    else:
        finding = balanced if task == "finding" else rng.integers(0, len(FINDINGS), count)
        laterality = np.where(finding == 0, 2, side)

    size_mm = np.zeros(count, dtype=np.int64)
    for index, name in enumerate(FINDINGS[1:], start=1):
        low, high = _SIZE_RANGE_MM[name]
        size_mm = np.where(finding == index, rng.integers(low, high + 1, count), size_mm)

    region = rng.integers(0, 2, count)  # 0 = upper/anterior, 1 = lower/posterior
    offset_x = rng.uniform(-1.0, 1.0, count)
    offset_y = rng.uniform(0.3, 1.0, count) * np.where(region == 0, -1.0, 1.0)
    lesion_x = np.zeros(count)
    lesion_y = np.zeros(count)
    for a_index, name in enumerate(ANATOMIES):
        for s_index in (0, 1):
            cx, cy, rx, ry = _LESION_REGIONS[name][LATERALITIES[s_index]]
            here = (anatomy == a_index) & (laterality == s_index)
            lesion_x = np.where(here, cx + offset_x * rx, lesion_x)
            lesion_y = np.where(here, cy + offset_y * ry, lesion_y)
    # One lesion in five is subtle: low contrast against its surroundings.
    subtle = rng.uniform(size=count) < 0.2
    contrast = np.where(subtle, rng.uniform(0.2, 0.3, count), rng.uniform(0.5, 0.9, count))
    return {
        "modality": modality,
        "anatomy": anatomy,
        "finding": finding,
        "laterality": laterality,
        "size_mm": size_mm,
        "region": region,
        "lesion_x": lesion_x,
        "lesion_y": lesion_y,
        "contrast": contrast,
        "template": rng.integers(0, 3, count),
        "axial": rng.uniform(size=count) < 0.5,
        "shape_phase": rng.uniform(0.0, 2 * math.pi, (count, 2)),
        "shape_amplitude": rng.uniform(0.08, 0.22, (count, 2)),
    }


# --------------------------------------------------------------------------------------------------------------
# The synthetic benchmark: rendering (vectorised over a batch of cases)
# --------------------------------------------------------------------------------------------------------------

_TISSUES = ("air", "fat", "soft", "organ", "lung", "fluid", "bone")
_T = {name: index for index, name in enumerate(_TISSUES)}
# Grey value of each tissue per modality (rows follow MODALITIES). CT: bone bright, lung dark. MRI (T2-like):
# fluid and fat bright, bone dark. X-ray (before the projection profile): dense is bright. Ultrasound: echogenicity.
_TISSUE_GREY = np.array(
    [
        # air   fat   soft  organ lung  fluid bone
        [0.00, 0.28, 0.45, 0.55, 0.06, 0.36, 0.95],  # CT
        [0.00, 0.72, 0.35, 0.47, 0.03, 0.90, 0.06],  # MRI
        [0.00, 0.42, 0.52, 0.56, 0.16, 0.68, 0.92],  # X-ray
        [0.00, 0.55, 0.40, 0.58, 0.85, 0.04, 0.95],  # ultrasound
    ],
    dtype=np.float32,
)

# Layouts: painted in order, each (tissue, shape, cx, cy, a, b[, thickness]); "mirror" shapes are painted at
# +cx and -cx. Units as in `_LESION_REGIONS`.
_LAYOUTS: dict[str, list[tuple]] = {
    "chest": [
        ("fat", "ellipse", 0.0, 0.05, 0.88, 0.62),
        ("soft", "ellipse", 0.0, 0.05, 0.82, 0.56),
        ("bone", "ribs", 0.0, 0.05, 0.78, 0.52, 0.035),
        ("lung", "mirror", 0.40, 0.0, 0.30, 0.44),
        ("organ", "ellipse", 0.06, -0.02, 0.20, 0.24),
        ("bone", "ellipse", 0.0, 0.50, 0.09, 0.08),
    ],
    "brain": [
        ("fat", "ellipse", 0.0, 0.0, 0.70, 0.88),
        ("bone", "ellipse", 0.0, 0.0, 0.66, 0.84),
        ("organ", "ellipse", 0.0, 0.0, 0.60, 0.78),
        ("soft", "ellipse", 0.0, 0.02, 0.44, 0.60),
        ("fluid", "mirror", 0.09, -0.04, 0.05, 0.20),
    ],
    "liver": [
        ("fat", "ellipse", 0.0, 0.05, 0.90, 0.66),
        ("soft", "ellipse", 0.0, 0.05, 0.84, 0.60),
        ("organ", "ellipse", -0.30, -0.05, 0.48, 0.45),
        ("fluid", "ellipse", 0.42, -0.12, 0.18, 0.16),
        ("fluid", "ellipse", 0.10, 0.30, 0.05, 0.05),
        ("bone", "ellipse", 0.0, 0.48, 0.10, 0.09),
    ],
    "kidney": [
        ("fat", "ellipse", 0.0, 0.05, 0.90, 0.66),
        ("soft", "ellipse", 0.0, 0.05, 0.84, 0.60),
        ("fat", "mirror", 0.42, 0.22, 0.20, 0.28),
        ("organ", "mirror", 0.42, 0.22, 0.13, 0.21),
        ("fat", "mirror", 0.37, 0.22, 0.04, 0.08),
        ("soft", "mirror", 0.16, 0.40, 0.08, 0.12),
        ("bone", "ellipse", 0.0, 0.45, 0.10, 0.09),
    ],
    "knee": [
        ("fat", "mirror", 0.45, 0.0, 0.38, 0.40),
        ("soft", "mirror", 0.45, 0.0, 0.33, 0.35),
        ("bone", "mirror", 0.45, 0.02, 0.15, 0.14),
        ("fat", "mirror", 0.45, 0.02, 0.11, 0.10),
        ("bone", "mirror", 0.45, -0.27, 0.07, 0.04),
    ],
}
# Effusion: the fluid fills the rim of a container ellipse (cx, cy, a, b) on the side the unit vector (dx, dy)
# points to; keyed by anatomy then side.
_EFFUSION_CONTAINERS = {
    "chest": {"right": (-0.40, 0.0, 0.30, 0.44, 0.0, 1.0), "left": (0.40, 0.0, 0.30, 0.44, 0.0, 1.0)},
    "brain": {"right": (0.0, 0.0, 0.60, 0.78, -1.0, 0.0), "left": (0.0, 0.0, 0.60, 0.78, 1.0, 0.0)},
    "liver": {"right": (-0.30, -0.05, 0.48, 0.45, -0.6, 0.8), "left": (-0.30, -0.05, 0.48, 0.45, 0.6, -0.8)},
    "kidney": {"right": (-0.42, 0.22, 0.13, 0.21, -0.6, 0.8), "left": (0.42, 0.22, 0.13, 0.21, 0.6, 0.8)},
    "knee": {"right": (-0.45, -0.10, 0.22, 0.20, 0.0, -1.0), "left": (0.45, -0.10, 0.22, 0.20, 0.0, -1.0)},
}


def _soft_ellipse(x: np.ndarray, y: np.ndarray, cx, cy, a, b, pixel: float) -> np.ndarray:
    """Anti-aliased ellipse mask in [0, 1]; parameters are scalars or arrays broadcasting against x."""
    radius = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return np.clip((1.0 - radius) * np.minimum(a, b) / pixel + 0.5, 0.0, 1.0)


def _gaussian_blur(images: np.ndarray, sigma: float, axes: tuple[int, ...] = (1, 2)) -> np.ndarray:
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in axes:
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(images, pad, mode="edge")
        size = images.shape[axis]
        window = [slice(None)] * images.ndim
        out = np.zeros_like(images)
        for offset, weight in enumerate(taps):
            window[axis] = slice(offset, offset + size)
            out += weight * padded[tuple(window)]
        images = out
    return images


def _smooth_noise(rng: np.random.Generator, count: int, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise, roughly unit variance: a random `cells` grid bilinearly upsampled to `size`."""
    grid = rng.standard_normal((count, cells + 1, cells + 1)).astype(np.float32)
    position = np.linspace(0.0, cells, size, dtype=np.float32)
    low = np.minimum(position.astype(np.int64), cells - 1)
    frac = position - low
    rows = grid[:, low, :] * (1 - frac)[None, :, None] + grid[:, low + 1, :] * frac[None, :, None]
    return rows[:, :, low] * (1 - frac)[None, None, :] + rows[:, :, low + 1] * frac[None, None, :]


def _layer_mask(x: np.ndarray, y: np.ndarray, layer: tuple, pixel: float) -> np.ndarray:
    tissue, shape, cx, cy, a, b, *rest = layer
    if shape == "ellipse":
        return _soft_ellipse(x, y, cx, cy, a, b, pixel)
    if shape == "mirror":
        # A pair of ellipses at +cx and -cx that do not touch the midline: one ellipse in |x|.
        return _soft_ellipse(np.abs(x), y, cx, cy, a, b, pixel)
    if shape == "ribs":
        (thickness,) = rest
        ring = _soft_ellipse(x, y, cx, cy, a, b, pixel) - _soft_ellipse(
            x, y, cx, cy, a - thickness, b - thickness, pixel
        )
        angle = np.arctan2(y - cy, x - cx)
        return np.clip(ring, 0, 1) * (np.cos(14.0 * angle) > -0.2)
    raise AssertionError(f"unknown layout shape {shape!r}")


@dataclass
class _Frame:
    """Where each pixel is: in anatomy units (`x`, `y`, moved with the patient) and image units (fixed)."""

    x: np.ndarray
    y: np.ndarray
    image_x: np.ndarray
    image_y: np.ndarray
    anatomy: np.ndarray
    size: int


def _render_cases(rng: np.random.Generator, cases: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Grey images in [0, 1], shape (count, size, size), of the given cases."""
    count = len(cases["finding"])
    pixel = 2.0 / size
    grid = (np.arange(size, dtype=np.float32) + 0.5) * pixel - 1.0
    image_x = np.broadcast_to(grid[None, None, :], (count, size, size))
    image_y = np.broadcast_to(grid[None, :, None], (count, size, size))

    def per_case(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)[:, None, None]

    # Nuisance: the patient is shifted, scaled, rotated and a bit wider or narrower in every image.
    shift_x, shift_y = per_case(rng.uniform(-0.07, 0.07, count)), per_case(rng.uniform(-0.07, 0.07, count))
    scale = per_case(rng.uniform(0.9, 1.08, count))
    aspect = per_case(rng.uniform(0.94, 1.06, count))
    angle = per_case(rng.uniform(-0.12, 0.12, count))
    x = (np.cos(angle) * (image_x - shift_x) + np.sin(angle) * (image_y - shift_y)) / (scale * aspect)
    y = (-np.sin(angle) * (image_x - shift_x) + np.cos(angle) * (image_y - shift_y)) / scale

    grey = _TISSUE_GREY[cases["modality"]] * rng.uniform(0.9, 1.1, (count, len(_TISSUES))).astype(np.float32)
    image = np.zeros((count, size, size), dtype=np.float32)
    for a_index, name in enumerate(ANATOMIES):
        here = np.flatnonzero(cases["anatomy"] == a_index)
        if here.size == 0:
            continue
        xs, ys, canvas = x[here], y[here], image[here]
        for layer in _LAYOUTS[name]:
            mask = _layer_mask(xs, ys, layer, pixel)
            canvas += mask * (grey[here, _T[layer[0]]][:, None, None] - canvas)
        image[here] = canvas

    # Texture inside the body: organs are not flat.
    texture = _smooth_noise(rng, count, size, cells=6)
    image *= 1.0 + 0.03 * texture
    _paint_findings(rng, image, x, y, cases, grey, pixel)

    modality = cases["modality"]
    for m_index, name in enumerate(MODALITIES):
        here = np.flatnonzero(modality == m_index)
        if here.size:
            frame = _Frame(x[here], y[here], image_x[here], image_y[here], cases["anatomy"][here], size)
            image[here] = _MODALITY_RENDERERS[name](rng, image[here], frame)

    gain = per_case(rng.uniform(0.85, 1.15, count))
    offset = per_case(rng.uniform(-0.04, 0.04, count))
    return np.clip(image * gain + offset, 0.0, 1.0)


def _paint_findings(
    rng: np.random.Generator,
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cases: dict[str, np.ndarray],
    grey: np.ndarray,
    pixel: float,
) -> None:
    """Draw each case's lesion in place, at its side and size (modality-agnostic: the renderers follow)."""
    fov = np.array([_FIELD_OF_VIEW_MM[ANATOMIES[a]] for a in cases["anatomy"]], dtype=np.float32)
    radius = (cases["size_mm"] / fov)[:, None, None].astype(np.float32)  # diameter mm -> radius in units
    contrast = cases["contrast"][:, None, None].astype(np.float32)
    lx = cases["lesion_x"].astype(np.float32)[:, None, None]
    ly = cases["lesion_y"].astype(np.float32)[:, None, None]
    finding = cases["finding"]

    nodule = np.flatnonzero(finding == FINDINGS.index("nodule"))
    if nodule.size:
        i = nodule
        blob = _soft_ellipse(x[i], y[i], lx[i], ly[i], radius[i], radius[i], pixel)
        image[i] += contrast[i] * blob

    mass = np.flatnonzero(finding == FINDINGS.index("mass"))
    if mass.size:
        i = mass
        theta = np.arctan2(y[i] - ly[i], x[i] - lx[i])
        phase = cases["shape_phase"][i].astype(np.float32)[:, :, None, None]
        amplitude = cases["shape_amplitude"][i].astype(np.float32)[:, :, None, None]
        lobes = (
            1.0
            + amplitude[:, 0] * np.sin(3 * theta + phase[:, 0])
            + amplitude[:, 1] * np.sin(5 * theta + phase[:, 1])
        )
        distance = np.sqrt((x[i] - lx[i]) ** 2 + (y[i] - ly[i]) ** 2)
        blob = np.clip((radius[i] * lobes - distance) / pixel + 0.5, 0.0, 1.0)
        heterogeneity = 1.0 + 0.25 * _smooth_noise(rng, i.size, x.shape[-1], cells=8)
        image[i] += contrast[i] * blob * heterogeneity

    cyst = np.flatnonzero(finding == FINDINGS.index("cyst"))
    if cyst.size:
        i = cyst
        rim = np.maximum(0.15 * radius[i], 0.8 * pixel)
        inner = _soft_ellipse(x[i], y[i], lx[i], ly[i], radius[i], radius[i], pixel)
        outer = _soft_ellipse(x[i], y[i], lx[i], ly[i], radius[i] + rim, radius[i] + rim, pixel)
        image[i] -= inner * np.minimum(image[i], 1.5 * contrast[i])
        image[i] += (outer - inner) * contrast[i]

    effusion = np.flatnonzero(finding == FINDINGS.index("effusion"))
    if effusion.size:
        i = effusion
        containers = np.array(
            [
                _EFFUSION_CONTAINERS[ANATOMIES[cases["anatomy"][k]]][LATERALITIES[cases["laterality"][k]]]
                for k in i
            ],
            dtype=np.float32,
        )
        cx, cy, a, b, dx, dy = (containers[:, j][:, None, None] for j in range(6))
        depth = 2.0 * radius[i]  # size_mm is the depth of the fluid
        inside = _soft_ellipse(x[i], y[i], cx, cy, a, b, pixel)
        shifted = _soft_ellipse(x[i] + dx * depth, y[i] + dy * depth, cx, cy, a, b, pixel)
        fluid = np.clip(inside - shifted, 0.0, 1.0)
        fluid_grey = grey[i, _T["fluid"]][:, None, None]
        image[i] += fluid * (fluid_grey - image[i])


def _render_ct(rng: np.random.Generator, image: np.ndarray, frame: _Frame) -> np.ndarray:
    # Quantum noise: white, level varying from scan to scan.
    sigma = rng.uniform(0.015, 0.045, (len(image), 1, 1)).astype(np.float32)
    return image + sigma * rng.standard_normal(image.shape).astype(np.float32)


def _render_mri(rng: np.random.Generator, image: np.ndarray, frame: _Frame) -> np.ndarray:
    count, image_x, image_y = len(image), frame.image_x, frame.image_y
    image = _gaussian_blur(image, 0.8 * frame.size / 64)
    # Coil bias field: a smooth multiplicative gradient across the image.
    tilt = rng.uniform(-0.18, 0.18, (count, 3, 1, 1)).astype(np.float32)
    image = image * (
        1.0 + tilt[:, 0] * image_x + tilt[:, 1] * image_y + tilt[:, 2] * (image_x**2 + image_y**2)
    )
    # Magnitude images have Rician noise.
    sigma = rng.uniform(0.01, 0.035, (count, 1, 1)).astype(np.float32)
    real = image + sigma * rng.standard_normal(image.shape).astype(np.float32)
    imaginary = sigma * rng.standard_normal(image.shape).astype(np.float32)
    return np.sqrt(real**2 + imaginary**2)


def _render_xray(rng: np.random.Generator, image: np.ndarray, frame: _Frame) -> np.ndarray:
    count = len(image)
    # A projection: what lies behind thick parts of the body adds up, so the centre is denser than the edges.
    # The thickness of the body outline (the layout's first layer) stands in for the path length.
    thickness = np.zeros_like(image)
    for a_index, name in enumerate(ANATOMIES):
        here = np.flatnonzero(frame.anatomy == a_index)
        if here.size:
            _, shape, cx, cy, a, b = _LAYOUTS[name][0]
            x = np.abs(frame.x[here]) if shape == "mirror" else frame.x[here]
            thickness[here] = np.sqrt(
                np.clip(1 - ((x - cx) / a) ** 2 - ((frame.y[here] - cy) / b) ** 2, 0, 1)
            )
    image = image * (0.5 + 0.5 * thickness)
    heel = rng.uniform(-0.12, 0.12, (count, 1, 1)).astype(np.float32)
    image = _gaussian_blur(image * (1.0 + heel * frame.image_y), 0.7 * frame.size / 64)
    sigma = rng.uniform(0.008, 0.02, (count, 1, 1)).astype(np.float32)
    return image + sigma * rng.standard_normal(image.shape).astype(np.float32)


def _render_ultrasound(rng: np.random.Generator, image: np.ndarray, frame: _Frame) -> np.ndarray:
    count, image_x, image_y, size = len(image), frame.image_x, frame.image_y, frame.size
    # Sector probe at the top centre: a fan, dark outside.
    depth = np.sqrt(image_x**2 + (image_y + 1.05) ** 2)
    angle = np.arctan2(image_x, image_y + 1.05)
    edge = 2.0 / size
    fan = np.clip((0.62 - np.abs(angle)) * depth / edge + 0.5, 0, 1) * np.clip((depth - 0.2) / edge, 0, 1)
    # Fully developed speckle: multiplicative Rayleigh noise, correlated along the beam's lateral direction.
    speckle = rng.rayleigh(1.0 / math.sqrt(math.pi / 2), image.shape).astype(np.float32)
    speckle = _gaussian_blur(_gaussian_blur(speckle, 0.9 * size / 64, axes=(2,)), 0.5 * size / 64, axes=(1,))
    attenuation = rng.uniform(0.15, 0.45, (count, 1, 1)).astype(np.float32)
    return image * speckle * np.exp(-attenuation * depth) * fan


_MODALITY_RENDERERS = {
    "CT": _render_ct,
    "MRI": _render_mri,
    "X-ray": _render_xray,
    "ultrasound": _render_ultrasound,
}


def _png_bytes(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Fast compression: the PNG stays lossless and byte-identical for identical pixels.
    Image.fromarray(grey).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _split_key(split_name: str | None) -> int:
    # crc32, not hash(): Python salts str hashes per process, and the data must not change between runs.
    return 0 if split_name is None else zlib.crc32(split_name.encode("utf-8")) + 1


def synthetic_medical_dataset(
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    task: str = "finding",
    split_name: str | None = None,
) -> datasets.Dataset:
    """The *synthetic* medical-style image-caption benchmark: procedural, offline, any size, same seed same bytes.

    Each row is one cross-sectional or projection image of a made-up patient with a report-style caption:
    `image` (PIL RGB), `caption` (e.g. "Axial CT of the chest shows a 12 mm nodule in the right lower lobe."),
    `label` (a `ClassLabel`, see `task`) and the metadata the caption states: `modality` (CT, MRI, X-ray,
    ultrasound), `anatomy` (chest, brain, liver, kidney, knee), `finding` (normal, nodule, mass, effusion, cyst),
    `laterality` (left, right, none) and `size_mm` (lesion diameter, effusion depth; 0 when normal).

    The image carries that structure: an anatomy layout (lungs, skull and ventricles, liver, kidneys, knees)
    painted with modality-specific grey levels and image formation (CT: bright bone, white noise; MRI: smooth,
    bias field, Rician noise; X-ray: projection profile and blur; ultrasound: fan, speckle, depth attenuation),
    and the finding drawn at its size on its side (radiological convention: the patient's right is on the image's
    left): a nodule is a small bright blob, a mass a larger irregular one, a cyst a dark disc with a bright rim,
    an effusion a rim of fluid at the base or edge of an organ. Position, scale, rotation, grey levels and noise
    vary from image to image, and one lesion in five has low contrast, so the task is not solved at once.

    Args:
        n: number of rows (> 0).
        seed: the random seed (>= 0). A given (seed, split_name, image_size) always yields the same rows, and the
            first k rows of a larger dataset are the rows of the dataset of size k.
        image_size: side of the square images in pixels (>= 16).
        task: which column `label` encodes: "finding" (the main downstream task), "modality", "anatomy" or
            "laterality" (a second downstream task). The task's classes are balanced (in blocks of 256 rows);
            for "laterality", "none" rows are normal studies.
        split_name: names the split (e.g. "train", "test"); different names give independent rows for one seed.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n={n!r} is not allowed: the number of rows must be an int > 0.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an int >= 0.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size={image_size!r} is not allowed: it must be an int >= 16.")
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task={task!r} is not allowed: it must be one of {sorted(SYNTHETIC_TASKS)}.")

    split_key = _split_key(split_name)
    # Render in sub-batches of about a million pixels so memory stays flat at any image size.
    render_batch = max(1, min(_SYNTHETIC_CHUNK, (1 << 20) // (image_size * image_size)))
    columns: dict[str, list] = {key: [] for key in ("image", "caption", *SYNTHETIC_TASKS, "size_mm")}
    for chunk in range(math.ceil(n / _SYNTHETIC_CHUNK)):
        cases = _draw_cases(np.random.default_rng([seed, split_key, chunk]), _SYNTHETIC_CHUNK, task)
        count = min(_SYNTHETIC_CHUNK, n - chunk * _SYNTHETIC_CHUNK)
        for start in range(0, count, render_batch):
            # Always render whole sub-batches (the random draws depend on their shape), then keep what is asked.
            part = {key: value[start : start + render_batch] for key, value in cases.items()}
            rng = np.random.default_rng([seed, split_key, chunk, image_size, start])
            grey = np.round(_render_cases(rng, part, image_size) * 255.0).astype(np.uint8)
            columns["image"].extend({"bytes": _png_bytes(g), "path": None} for g in grey[: count - start])
        cases = {key: value[:count] for key, value in cases.items()}
        for k in range(count):
            names = {
                "modality": MODALITIES[cases["modality"][k]],
                "anatomy": ANATOMIES[cases["anatomy"][k]],
                "finding": FINDINGS[cases["finding"][k]],
                "laterality": LATERALITIES[cases["laterality"][k]],
            }
            size_mm = int(cases["size_mm"][k])
            columns["caption"].append(
                _synthetic_caption(
                    **names,
                    size_mm=size_mm,
                    region=int(cases["region"][k]),
                    template=int(cases["template"][k]),
                    axial=bool(cases["axial"][k]),
                )
            )
            for key, value in names.items():
                columns[key].append(value)
            columns["size_mm"].append(size_mm)

    class_names = SYNTHETIC_TASKS[task]
    columns["label"] = [class_names.index(value) for value in columns[task]]
    features = datasets.Features(
        {
            # Stored as 8-bit grey PNG (a third of the bytes), decoded as RGB like every other source.
            "image": datasets.Image(mode="RGB"),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(class_names)),
            **{key: datasets.Value("string") for key in SYNTHETIC_TASKS},
            "size_mm": datasets.Value("int32"),
        }
    )
    info = datasets.DatasetInfo(
        features=features,
        description=(
            f"synthetic medical-style image-caption benchmark (ran_peft.data.synthetic_medical_dataset): n={n}, "
            f"seed={seed}, image_size={image_size}, task={task!r}, split_name={split_name!r}. Procedural images, "
            "not real patient data."
        ),
    )
    split = datasets.NamedSplit(split_name) if split_name else None
    return datasets.Dataset.from_dict({key: columns[key] for key in features}, info=info, split=split)


# --------------------------------------------------------------------------------------------------------------
# Real data: captions from class names, image folders, DICOM folders, Hub datasets, MedMNIST
# --------------------------------------------------------------------------------------------------------------

DEFAULT_CAPTION_TEMPLATE = "An image of {}."


def _class_caption(name: str, template: str = DEFAULT_CAPTION_TEMPLATE) -> str:
    return template.format(name.replace("_", " "))


def _fail_column(field: str, column: str, available: Sequence[str], source: str) -> None:
    raise ValueError(
        f"{field}={column!r}: {source} has no such column; available columns: {sorted(available)}."
    )


def standardize_columns(
    dataset: datasets.Dataset,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    label_column: str | None = None,
    source: str = "the dataset",
) -> datasets.Dataset:
    """Rename a dataset's columns to ours: `image` (an `Image` feature), `caption`, and `label` when it has one.

    `caption_column=None` keeps a `caption` column if there is one, else writes "An image of <class>." from a
    `ClassLabel` label. `label_column=None` keeps a `label` column if there is one. Other columns stay as they are.

    Raises:
        ValueError: a named column is missing (the message lists the available ones), the image column holds
            neither images nor paths/bytes, or there is neither a caption column nor a `ClassLabel` label.
    """
    available = list(dataset.column_names)
    for field, column in (
        ("image_column", image_column),
        ("caption_column", caption_column),
        ("label_column", label_column),
    ):
        if column is not None and column not in available:
            _fail_column(field, column, available, source)

    renames = {image_column: "image"}
    if caption_column is not None:
        renames[caption_column] = "caption"
    if label_column is not None:
        renames[label_column] = "label"
    renames = {old: new for old, new in renames.items() if old != new}
    # The user named the source column, so a column already called like the target is replaced by it.
    clashing = [new for new in renames.values() if new in available and new not in renames]
    if clashing:
        logger.info("standardize_columns: replacing the existing column(s) %s of %s.", clashing, source)
        dataset = dataset.remove_columns(clashing)
    if renames:
        dataset = dataset.rename_columns(renames)

    image_feature = dataset.features["image"]
    if not isinstance(image_feature, datasets.Image):
        if isinstance(image_feature, datasets.Value) and image_feature.dtype in (
            "string",
            "large_string",
            "binary",
        ):
            dataset = dataset.cast_column("image", datasets.Image())
        else:
            raise ValueError(
                f"image_column={image_column!r} of {source} holds {image_feature}, not images: it must be an "
                "`Image` feature, or file paths or encoded bytes that `datasets.Image` can decode."
            )

    if "caption" not in dataset.column_names:
        label_feature = dataset.features.get("label")
        if not isinstance(label_feature, datasets.ClassLabel):
            raise ValueError(
                f"{source} has no captions: pass caption_column (one of {sorted(dataset.column_names)}) or a "
                "label_column that is a `ClassLabel`, from whose class names captions are written."
            )
        names = label_feature.names
        dataset = dataset.map(
            lambda batch: {"caption": [_class_caption(names[label]) for label in batch["label"]]},
            batched=True,
            desc="captions from class names",
        )
    return dataset


def _existing_directory(path: str | Path, field: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        state = "is a file" if directory.exists() else "does not exist"
        raise ValueError(f"{field}={str(path)!r} {state}: it must be an existing directory.")
    return directory


def load_image_folder(
    path: str | Path,
    *,
    label_from: str = "folder",
    captions: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """An image folder (`datasets`' "imagefolder" builder) with our columns: `image`, `caption`, `label`.

    Layout: `path/<class name>/<image>` (labels from the sub-folder names), optionally split into
    `path/train/...`, `path/test/...`, and optionally a `metadata.csv` / `metadata.jsonl` beside the images with a
    `file_name` column and more columns (e.g. captions), which are kept.

    Args:
        label_from: "folder" (the `label` column, a `ClassLabel` of the sub-folder names) or "none".
        captions: the metadata column holding the captions. Default: a `caption` or `text` column if there is
            one, else "An image of <class name>." from the folder label.
        split: which split to load ("train" when the folder has no split sub-folders).
        cache_dir: where `datasets` caches the built dataset (default: its usual cache).
    """
    root = _existing_directory(path, "path")
    if label_from not in ("folder", "none"):
        raise ValueError(f"label_from={label_from!r} is not allowed: it must be 'folder' or 'none'.")
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(root), split=split, drop_labels=label_from == "none", cache_dir=cache_dir
    )
    source = f"the image folder {root.name!r}"
    if label_from == "folder" and "label" not in dataset.column_names:
        # `datasets` drops the folder labels as soon as there is a metadata file; put them back.
        dataset = _labels_from_folders(dataset)
    if captions is None:
        captions = next((name for name in ("caption", "text") if name in dataset.column_names), None)
    elif captions not in dataset.column_names:
        _fail_column("captions", captions, dataset.column_names, f"{source} (with its metadata file)")
    if captions is None and label_from == "none":
        raise ValueError(
            f"{source} has no captions and label_from='none': add a metadata.csv/jsonl with a caption column, "
            "or use label_from='folder' to write captions from the class names."
        )
    return standardize_columns(dataset, caption_column=captions, source=source)


def _labels_from_folders(dataset: datasets.Dataset) -> datasets.Dataset:
    paths = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    folders = [Path(item["path"]).parent.name for item in paths]
    names = sorted(set(folders))
    return dataset.add_column(
        "label", [names.index(folder) for folder in folders], feature=datasets.ClassLabel(names=names)
    )


_DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MODALITY_NAMES = {
    "CT": "CT",
    "MR": "MRI",
    "CR": "X-ray",
    "DX": "X-ray",
    "DR": "X-ray",
    "RG": "X-ray",
    "RF": "fluoroscopy",
    "XA": "angiography",
    "US": "ultrasound",
    "MG": "mammography",
    "PT": "PET",
    "NM": "nuclear medicine",
    "OT": "medical",
    "SC": "medical",
}
_PATIENT_POSITIONS = {
    "HFS": "head first, supine",
    "HFP": "head first, prone",
    "FFS": "feet first, supine",
    "FFP": "feet first, prone",
    "HFDR": "head first, decubitus right",
    "HFDL": "head first, decubitus left",
    "FFDR": "feet first, decubitus right",
    "FFDL": "feet first, decubitus left",
}


# How many unreadable files a folder's error lists by name (the rest are counted).
MAX_LISTED_UNREADABLE = 10


class UnreadableDicomError(ValueError):
    """A DICOM file that cannot be turned into an image: not DICOM, truncated, or without pixel data."""


def _dicom_files(root: Path, recursive: bool) -> list[Path]:
    candidates = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in _DICOM_SUFFIXES)


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _scan_plane(orientation: Any) -> str | None:
    if orientation is None or len(orientation) != 6:
        return None
    row, column = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    # The slice normal's main axis: x (patient left-right) -> sagittal, y -> coronal, z -> axial.
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(np.cross(row, column))))]


def _dicom_caption(ds: Any) -> tuple[str, str, str | None]:
    code = str(ds.get("Modality", "") or "").strip().upper()
    modality = _DICOM_MODALITY_NAMES.get(code, code or "medical")
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().lower().replace("_", " ") or None
    caption = f"{modality} of the {body_part}" if body_part else f"{modality} image"
    plane = _scan_plane(ds.get("ImageOrientationPatient"))
    details = [plane] if plane else []
    position = str(ds.get("PatientPosition", "") or "").strip().upper()
    if position:
        details.append(_PATIENT_POSITIONS.get(position, position.lower()))
    if details:
        caption += f" ({', '.join(details)})"
    descriptions = [str(ds.get(tag, "") or "").strip() for tag in ("StudyDescription", "SeriesDescription")]
    descriptions = [d for i, d in enumerate(descriptions) if d and d not in descriptions[:i]]
    if descriptions:
        caption += ". " + "; ".join(descriptions)
    return caption.rstrip(".") + ".", modality, body_part


def _window_to_uint8(pixels: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is not None:
        center, width = window
        low, high = center - width / 2.0, center + width / 2.0
    else:
        low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round(np.clip((pixels - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def dicom_to_image(ds: Any, window: tuple[float, float] | None = None) -> Image.Image:
    """An 8-bit RGB image of a pydicom dataset's pixels.

    Grey images: the rescale slope/intercept are applied, then a linear window: the file's WindowCenter and
    WindowWidth when present, else `window` (center, width) in rescaled units, else the pixels' min-max.
    MONOCHROME1 is inverted. Multi-frame files give their middle frame. Colour images are scaled to 8 bits.
    """
    pixels = ds.pixel_array
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels, samples = apply_color_lut(pixels, ds), 3  # indices -> RGB through the file's own palette
    if samples > 1:
        if pixels.dtype != np.uint8:
            pixels = _window_to_uint8(pixels.astype(np.float32), None)
        return Image.fromarray(pixels).convert("RGB")
    slope = _first_number(ds.get("RescaleSlope")) or 1.0
    intercept = _first_number(ds.get("RescaleIntercept")) or 0.0
    values = pixels.astype(np.float32) * slope + intercept
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        window = (center, width)
    grey = _window_to_uint8(values, window)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey).convert("RGB")


def _read_without_file_meta(path: Path) -> Any:
    """A file without the 'DICM' header and file meta (ACR-NEMA style, as older exports write) that still holds an
    image, with the transfer syntax its encoding implies; None when it is not one."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
            return None
        implicit, little = ds.original_encoding
    except Exception:  # garbage read by force: not an image
        return None
    if implicit is None:
        return None
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    return ds


def _read_dicom(path: Path, window: tuple[float, float] | None) -> tuple[Image.Image, Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as error:
        ds = _read_without_file_meta(path)
        if ds is None:
            raise UnreadableDicomError(
                f"DICOM file {str(path)!r} is not a valid DICOM file: {error}"
            ) from error
    except Exception as error:  # pydicom raises many kinds on truncated or corrupt files
        raise UnreadableDicomError(
            f"DICOM file {str(path)!r} cannot be read: {type(error).__name__}: {error}"
        ) from error
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        modality = ds.get("Modality", "unknown")
        raise UnreadableDicomError(
            f"DICOM file {str(path)!r} has no pixel data (Modality {modality}): it is not an image, or its pixel data is cut short."
        )
    try:
        image = dicom_to_image(ds, window)
    except Exception as error:  # decoding: truncated pixel data, missing codec, bad tags
        raise UnreadableDicomError(
            f"DICOM file {str(path)!r} has pixel data that cannot be decoded: {type(error).__name__}: {error}"
        ) from error
    return image, ds


def load_dicom_folder(
    path: str | Path,
    *,
    window: tuple[float, float] | None = None,
    recursive: bool = True,
    skip_unreadable: bool = False,
) -> datasets.Dataset:
    """Every DICOM file (`*.dcm`, `*.dicom`) under `path` as a dataset: `image` (8-bit RGB), `caption`,
    `modality`, `body_part` and `source_path`.

    Pixels go through `dicom_to_image` (rescale, then the file's window, else `window`, else min-max). The
    caption is built from the tags Modality, BodyPartExamined, ImageOrientationPatient (scan plane),
    PatientPosition, StudyDescription and SeriesDescription, e.g. "CT of the head (axial, head first, supine).";
    `modality` uses the synthetic benchmark's names where they exist (CT, MRI, X-ray, ultrasound).
    `source_path` is relative to `path`, so no user directory leaks into data that may be shared.

    Args:
        window: (center, width) for files without WindowCenter/WindowWidth, in rescaled units (e.g. HU).
        recursive: also look in sub-folders.
        skip_unreadable: skip files that are not readable DICOM images (logged, counted in the dataset's
            `info.description`) instead of raising.

    Raises:
        UnreadableDicomError (a ValueError): some files are not DICOM, are truncated, hold no image or cannot
            be decoded, and `skip_unreadable` is False. The message counts them, names each (up to 10) with
            its reason, and points to `skip_unreadable=True`.
        ValueError: `path` is not a directory or holds no readable DICOM image.
    """
    root = _existing_directory(path, "path")
    if window is not None:
        if len(window) != 2 or not float(window[1]) > 0:
            raise ValueError(f"window={window!r} is not allowed: it must be (center, width) with width > 0.")
        window = (float(window[0]), float(window[1]))
    files = _dicom_files(root, recursive)
    if not files:
        where = "under" if recursive else "in"
        raise ValueError(f"path={str(path)!r}: no DICOM files ({', '.join(_DICOM_SUFFIXES)}) {where} it.")

    columns: dict[str, list] = {
        "image": [],
        "caption": [],
        "modality": [],
        "body_part": [],
        "source_path": [],
    }
    skipped: list[str] = []
    failures: list[UnreadableDicomError] = []
    for file in files:
        relative = file.relative_to(root).as_posix()
        try:
            image, ds = _read_dicom(file, window)
        except UnreadableDicomError as error:
            if not skip_unreadable:
                failures.append(error)
                continue
            logger.warning("Skipping %s: %s", relative, error)
            skipped.append(relative)
            continue
        caption, modality, body_part = _dicom_caption(ds)
        columns["image"].append(image)
        columns["caption"].append(caption)
        columns["modality"].append(modality)
        columns["body_part"].append(body_part)
        columns["source_path"].append(relative)
    if failures:
        shown = "\n".join(f"  - {error}" for error in failures[:MAX_LISTED_UNREADABLE])
        more = len(failures) - MAX_LISTED_UNREADABLE
        if more > 0:
            shown += f"\n  ... and {more} more"
        raise UnreadableDicomError(
            f"path={str(path)!r}: {len(failures)} of {len(files)} DICOM files cannot be read as images "
            f"({len(files) - len(failures)} can):\n{shown}\nPass `skip_unreadable=True` to load the others and "
            "skip these (they are logged and listed in the dataset's `info.description`)."
        )
    if skipped:
        logger.warning(
            "Skipped %d of %d DICOM files under %s as unreadable.", len(skipped), len(files), root.name
        )
    if not columns["image"]:
        raise ValueError(f"path={str(path)!r}: none of its {len(files)} DICOM files is a readable image.")

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "modality": datasets.Value("string"),
            "body_part": datasets.Value("string"),
            "source_path": datasets.Value("string"),
        }
    )
    description = f"DICOM folder {root.name!r}: {len(columns['image'])} images"
    if skipped:
        description += f"; skipped {len(skipped)} unreadable files: {', '.join(skipped)}"
    info = datasets.DatasetInfo(description=description + ".", features=features)
    return datasets.Dataset.from_dict(columns, info=info)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_hub_dataset(
    name: str,
    *,
    split: str = "train",
    image_column: str = "image",
    caption_column: str | None = None,
    label_column: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> datasets.Dataset:
    """A Hugging Face Hub dataset (or a local dataset folder) with our columns, via `standardize_columns`.

    `name` is a Hub id ("owner/name"), a local folder `datasets.load_dataset` can read (parquet, csv, images),
    or a folder written by `Dataset.save_to_disk`. Remote code is never run unless `trust_remote_code=True`
    (recent `datasets` versions ignore it: they no longer run dataset scripts).

    Raises:
        ValueError: a named column is missing (the message lists the available ones), or `split` is missing
            from a saved `DatasetDict`.
    """
    local = Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"split={split!r}: the saved dataset {local.name!r} has splits {sorted(loaded)}."
                )
            loaded = loaded[split]
        source = f"the saved dataset {local.name!r}"
    else:
        options: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
        loaded = datasets.load_dataset(name, split=split, revision=revision, **options)
        source = f"dataset {name!r} (split {split!r})"
    return standardize_columns(
        loaded,
        image_column=image_column,
        caption_column=caption_column,
        label_column=label_column,
        source=source,
    )


def load_medmnist(
    flag: str = "pathmnist", split: str = "train", size: int = 28, root: str | None = None
) -> datasets.Dataset:
    """A MedMNIST dataset (single-label ones) through the `medmnist` package: `image`, `caption`, `label`.

    Needs `pip install medmnist` and network access the first time (it downloads from Zenodo into `root`,
    default `~/.medmnist`). Captions are "An image of <class>." from MedMNIST's class names.

    Raises:
        ImportError: `medmnist` is not installed.
        ValueError: unknown `flag`, `split` or `size`, or a multi-label flag (e.g. chestmnist).
    """
    try:
        import medmnist
    except ImportError as error:
        raise ImportError(
            "load_medmnist needs the `medmnist` package, which is not installed: run `pip install medmnist`. "
            "It downloads the data from Zenodo, so the first call needs network access."
        ) from error
    if flag not in medmnist.INFO:
        raise ValueError(f"flag={flag!r} is not a MedMNIST dataset; known flags: {sorted(medmnist.INFO)}.")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not allowed: it must be 'train', 'val' or 'test'.")
    if size not in (28, 64, 128, 224):
        raise ValueError(f"size={size!r} is not allowed: MedMNIST images are 28, 64, 128 or 224 pixels.")
    info = medmnist.INFO[flag]
    if "multi-label" in info["task"]:
        raise ValueError(
            f"flag={flag!r} is a multi-label task ({info['task']}); only single-label flags are supported."
        )
    options: dict[str, Any] = {"split": split, "download": True}
    if size != 28:
        options["size"] = size
    if root is not None:
        options["root"] = root
    source = getattr(medmnist, info["python_class"])(**options)
    names = [info["label"][key] for key in sorted(info["label"], key=int)]
    labels = np.asarray(source.labels).reshape(len(source.labels), -1)[:, 0].astype(int).tolist()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(np.asarray(pixels)).convert("RGB") for pixels in source.imgs],
            "caption": [_class_caption(names[label]) for label in labels],
            "label": labels,
        },
        features=features,
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def load_dataset_any(spec: str, **kwargs: Any) -> datasets.Dataset:
    """Load by a single string: the synthetic benchmark, a local folder, or a Hub dataset.

    - "synthetic" or "synthetic:<task>" (finding, modality, anatomy, laterality): `synthetic_medical_dataset`;
      `n` defaults to 1000.
    - an existing directory: a `save_to_disk` folder -> `load_hub_dataset`; a folder holding `.dcm` files ->
      `load_dicom_folder`; any other folder -> `load_image_folder`.
    - otherwise a Hub id ("name" or "owner/name") -> `load_hub_dataset`.

    `kwargs` go to the chosen loader.

    Raises:
        ValueError: `spec` is none of these (e.g. a path that does not exist).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec={spec!r} is not allowed: it must be a non-empty string.")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        task = spec.partition(":")[2] or kwargs.pop("task", "finding")
        return synthetic_medical_dataset(kwargs.pop("n", 1000), task=task, **kwargs)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return load_hub_dataset(spec, **kwargs)
        if _dicom_files(path, kwargs.get("recursive", True)):
            return load_dicom_folder(path, **kwargs)
        return load_image_folder(path, **kwargs)
    if path.exists():
        raise ValueError(f"spec={spec!r} is a file: pass the folder that holds it.")
    if _HUB_ID.fullmatch(spec) and ".." not in spec:
        return load_hub_dataset(spec, **kwargs)
    raise ValueError(
        f"spec={spec!r} is not 'synthetic[:task]', an existing directory, or a Hub id ('name' or 'owner/name'); "
        "if it is a local path, it does not exist."
    )


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
