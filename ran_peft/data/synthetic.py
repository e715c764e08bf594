"""The *synthetic* medical-style image-caption benchmark: procedural cases (modality, anatomy, finding, laterality,
size), rendered images and report-style captions, offline and reproducible."""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

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
