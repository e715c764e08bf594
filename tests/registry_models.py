"""Tiny models of every family in transformers' auto mappings for image-text-to-text, zero-shot image classification
and image classification, in the installed version: each built from its config class (shrunk by
`registry_shrink`) with its real image processor class (PIL backend), offline.

`registry_families()` lists the families; `build_tiny(family)` builds one or raises `NotBuildable` with the reason
it cannot be built here. Generative VLMs get as many image tokens as their vision tower makes features, read from
the model itself (`get_image_features`), so no per-family token formula is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers as tf
from registry_overrides import OVERRIDES, Override
from registry_shrink import (
    SPECIAL_START,
    STAGED_IMAGE_SIZE,
    WIDTH,
    is_staged,
    shrink_config_dict,
    with_equal_kv_heads,
)
from transformers.models.auto import configuration_auto, image_processing_auto, modeling_auto, processing_auto

# The mappings swept, by task name, as transformers names them.
MAPPINGS = {
    "image-text-to-text": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "zero-shot-image-classification": "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}
# Above this many parameters a shrunk model is not tiny: some part of it ignored the shrinker.
MAX_PARAMETERS = 5_000_000
NUM_LABELS = 3
TEXT_LENGTH = 6
GREY_LOW, GREY_HIGH = 64, 192  # the solid probes: two greys, and the low grey with one channel raised

# Why a family cannot be built here; the table groups families by these.
TORCHVISION_ONLY = "torchvision only"
NO_IMAGE_INPUT = "no image input"
TOO_LARGE = "too large to shrink"
NO_IMAGE_PROCESSOR = "no image processor in the registry"
DOES_NOT_BUILD = "tiny build fails"
MISSING_DEPENDENCY = "needs a package not installed"
DEFAULT_BROKEN = "its default config builds no model"


def _import_error(error: ImportError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class NotBuildable(Exception):
    """This family cannot be built tiny here; `reason` is one of the module's reasons, `detail` says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class RegistryFamily:
    mapping: str  # the task whose auto mapping lists it
    model_type: str
    head_class: str

    @property
    def id(self) -> str:
        return f"{self.mapping}:{self.model_type}"


@dataclass
class TinyFamily:
    family: RegistryFamily
    kind: str  # generative, dual_encoder or image_classifier: the batch this test builds for it
    model: torch.nn.Module
    image_processor: Any
    batch: dict[str, Any]
    # The same batch made from solid images: the low grey, the high grey, then the low grey with each channel in
    # turn raised to the high grey's value.
    probes: tuple[dict[str, Any], ...]
    target_modules: Any
    modules_to_save: list[str] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    parameters: int = 0
    label_names: list[str] | None = None


def registry_families() -> list[RegistryFamily]:
    families = []
    for mapping, attribute in MAPPINGS.items():
        for model_type, head in getattr(modeling_auto, attribute).items():
            head = head[0] if isinstance(head, (tuple, list)) else head
            families.append(RegistryFamily(mapping, model_type, head))
    return families


def images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB images (a random 4x4 grid, bilinearly enlarged) with values in [16, 239]: resizing them
    never overshoots to 0 or 255, so no real pixel can come out exactly at a processor's padding value."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    result = []
    for height, width in sizes:
        grid = rng.integers(16, 240, (4, 4, 3), dtype=np.uint8)
        result.append(np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR)))
    return result


def solid(sizes: list[tuple[int, int]], colour: tuple[int, int, int]) -> list[np.ndarray]:
    return [
        np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, 3)).copy()
        for height, width in sizes
    ]


def probe_colours() -> list[tuple[int, int, int]]:
    low, high = (GREY_LOW,) * 3, (GREY_HIGH,) * 3
    raised = [
        tuple(GREY_HIGH if index == channel else GREY_LOW for index in range(3)) for channel in range(3)
    ]
    return [low, high, *raised]


# ------------------------------------------------------------------------------------------------ classes


def _head_class(family: RegistryFamily) -> type:
    head = getattr(tf, family.head_class, None)
    if head is None:
        raise NotBuildable(DOES_NOT_BUILD, f"transformers has no class {family.head_class}")
    return head


def image_processor_class(family: RegistryFamily, override: Override) -> type:
    """The family's PIL image processor class from the registry (or the override table)."""
    if override.image_processor is not None:
        return getattr(tf, override.image_processor)
    names = image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES
    backends = names.get(family.model_type)
    if not backends:
        # The family shares its processor class with another family (a mixture-of-experts variant with its dense
        # sibling): that family's image processor is the one the processor class is used with.
        shared = processing_auto.PROCESSOR_MAPPING_NAMES.get(family.model_type)
        siblings = [
            other
            for other, processor in processing_auto.PROCESSOR_MAPPING_NAMES.items()
            if shared
            and processor == shared
            and other != family.model_type
            and (names.get(other) or {}).get("pil")
        ]
        if not siblings:
            raise NotBuildable(
                NO_IMAGE_PROCESSOR, f"IMAGE_PROCESSOR_MAPPING_NAMES has no {family.model_type!r}"
            )
        backends = names[siblings[0]]
    if not backends.get("pil"):
        raise NotBuildable(TORCHVISION_ONLY, f"only {backends.get('torchvision')} (torchvision backend)")
    found = getattr(tf, backends["pil"], None)
    if found is None:
        raise NotBuildable(DOES_NOT_BUILD, f"transformers has no class {backends['pil']}")
    return found


_KIND_BY_MAPPING = {
    "image-text-to-text": "generative",
    "zero-shot-image-classification": "dual_encoder",
    "image-classification": "image_classifier",
}


def kind_of(family: RegistryFamily) -> str:
    """The batch this test builds: what the mapping's task feeds its models."""
    return _KIND_BY_MAPPING[family.mapping]


# ------------------------------------------------------------------------------------------------ the build


def _vision_patch_size(config: Any) -> int | None:
    """The patch size of the vision tower (the first `patch_size` found, sub-configs first)."""
    for name in ("vision_config", "visual_config", "vision_tower_config", "image_config"):
        sub = getattr(config, name, None)
        value = getattr(sub, "patch_size", None) if sub is not None else None
        if isinstance(value, (list, tuple)) and value:
            value = max(value)
        if isinstance(value, int):
            return value
    value = getattr(config, "patch_size", None)
    if isinstance(value, (list, tuple)) and value:
        value = max(value)
    return value if isinstance(value, int) else None


def _image_sizes_in(config_dict: dict, found: set[int]) -> set[int]:
    for name, value in config_dict.items():
        if isinstance(value, dict) and "model_type" in value:
            _image_sizes_in(value, found)
        elif name == "image_size" and isinstance(value, int):
            found.add(value)
        elif name == "image_size" and isinstance(value, (list, tuple)) and value:
            found.add(max(value))
    return found


_PROCESSOR_SIZE_ATTRIBUTES = ("size", "crop_size", "max_image_size", "image_grid_pinpoints", "tile_size")


def _uses_mrope(config_class: type) -> bool:
    """Whether the config (or a sub-config) declares multimodal rotary sections (`mrope_section`)."""
    classes = [config_class, *(getattr(config_class, "sub_configs", None) or {}).values()]
    return any(
        "mrope_section" in (getattr(item, "ignore_keys_at_rope_validation", None) or ()) for item in classes
    )


def _merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` set, recursing into sub-config dicts."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and "model_type" in merged[key]:
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _scale_pinpoints(config: dict, scale: float) -> None:
    """Tiling grids (`image_grid_pinpoints`) are in pixels of the vision tower's image size: they shrink with it."""
    for key, value in config.items():
        if key == "image_grid_pinpoints" and isinstance(value, list):
            config[key] = [[max(1, round(edge * scale)) for edge in point] for point in value]
        elif isinstance(value, dict) and "model_type" in value:
            _scale_pinpoints(value, scale)


def _any_staged(config: dict) -> bool:
    return is_staged(config) or any(
        _any_staged(value) for value in config.values() if isinstance(value, dict) and "model_type" in value
    )


def build_config(family: RegistryFamily, override: Override) -> tuple[Any, int | None, int | None]:
    """The tiny config, the model's old and new image size (None when its towers have none)."""
    config_class = configuration_auto.CONFIG_MAPPING[family.model_type]
    defaults = config_class(**override.config_defaults).to_dict()
    # A sub-config a family leaves out by default (a vision tower, an image tokenizer) is built from its defaults:
    # this test needs the image path.
    for name, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        if defaults.get(name) is None and any(part in name for part in ("vision", "vq", "image", "visual")):
            with contextlib.suppress(Exception):  # the family then builds without it, or says why not
                defaults[name] = sub_class().to_dict()
    old_sizes = _image_sizes_in(defaults, set())
    old_size = max(old_sizes) if old_sizes else None
    patch = override.patch_size or _vision_patch_size(config_class(**override.config_defaults))
    if override.image_size:
        new_size = override.image_size
    elif old_size and _any_staged(defaults):
        new_size = STAGED_IMAGE_SIZE
    else:
        new_size = patch * 4 if (old_size and patch) else None
    tiny = shrink_config_dict(
        defaults, image_size=new_size, mrope=override.mrope or _uses_mrope(config_class)
    )
    if old_size and new_size:
        _scale_pinpoints(tiny, new_size / old_size)
    for key in (
        "transformers_version",
        "architectures",
        "_name_or_path",
        "model_type",
        "id2label",
        "label2id",
    ):
        tiny.pop(key, None)
    tiny = _merged(tiny, override.config)
    if kind_of(family) == "image_classifier":
        tiny["num_labels"] = NUM_LABELS
    try:
        return config_class(**tiny), old_size, new_size
    except Exception as error:  # noqa: BLE001 - reported as the reason it does not build
        if "key_value_heads" in str(error):  # its validator wants as many key/value heads as query heads
            with contextlib.suppress(Exception):
                return config_class(**with_equal_kv_heads(tiny)), old_size, new_size
        raise NotBuildable(DOES_NOT_BUILD, f"config: {type(error).__name__}: {error}") from error


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):  # SizeDict
        return {key: item for key, item in dataclasses.asdict(value).items() if item is not None}
    return value


def _processor_base_size(processor: Any) -> int | None:
    """The edge the processor makes its images (or tiles) at: crop size, else size; None where its sizes are pixel
    counts or budgets (Qwen-style `shortest_edge`/`longest_edge` as min/max pixels)."""
    for name in ("crop_size", "size"):
        value = _plain(getattr(processor, name, None))
        if not isinstance(value, dict):
            continue
        if {"height", "width"} <= value.keys():
            return max(value["height"], value["width"])
        if "shortest_edge" in value and "longest_edge" in value and value["shortest_edge"] > 4096:
            return None
        for key in ("shortest_edge", "longest_edge"):
            if key in value:
                return value[key]
    return None


def _scaled(value: Any, base: int, new: int) -> Any:
    if isinstance(value, dict):
        return {key: _scaled(item, base, new) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(item, base, new) for item in value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 8:
        return max(1, round(value * new / base))
    return value


_MODEL_PATCH_ATTRIBUTES = {"patch_size": "patch_size", "merge_size": "spatial_merge_size",
                           "temporal_patch_size": "temporal_patch_size"}  # fmt: skip


def _vision_value(config: Any, name: str) -> Any:
    for sub_name in ("vision_config", "visual_config", "vision_tower_config"):
        sub = getattr(config, sub_name, None)
        if sub is not None and getattr(sub, name, None) is not None:
            return getattr(sub, name)
    return getattr(config, name, None)


def build_image_processor(
    processor_class: type, override: Override, config: Any, new_size: int | None
) -> Any:
    """The family's image processor, making images of the tiny model's size with the model's patch sizes."""
    defaults = processor_class(**override.processor)
    changes = {}
    for processor_name, model_name in _MODEL_PATCH_ATTRIBUTES.items():
        value = _vision_value(config, model_name)
        current = getattr(defaults, processor_name, None)
        if isinstance(current, int) and isinstance(value, int) and current != value:
            changes[processor_name] = value
    base = _processor_base_size(defaults)
    if base and new_size and base != new_size:
        for name in _PROCESSOR_SIZE_ATTRIBUTES:
            value = _plain(getattr(defaults, name, None))
            if value is not None:
                changes[name] = _scaled(value, base, new_size)
    changes = {key: value for key, value in changes.items() if key not in override.processor}
    return processor_class(**{**override.processor, **changes}) if changes else defaults


def _image_token_id(config: Any) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def process(processor: Any, pixels_images: list[np.ndarray]) -> dict[str, Any]:
    """The processor's batch for one image per sample. Processors of image lists (Idefics, SmolVLM) read a flat
    list as one sample's images: they get one list per sample."""
    processed = processor(images=pixels_images, return_tensors="pt")
    pixel_values = processed.get("pixel_values")
    if (
        len(pixels_images) > 1
        and torch.is_tensor(pixel_values)
        and pixel_values.dim() >= 5
        and (pixel_values.shape[0] == 1)
    ):
        processed = processor(images=[[image] for image in pixels_images], return_tensors="pt")
    return processed


def _first_token(config: Any, names: tuple[str, ...]) -> int | None:
    """The first of these special tokens the config names: what a processor puts around the image tokens."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _pixel_inputs(processed: dict[str, Any], accepted: set[str]) -> dict[str, Any]:
    return {key: value for key, value in processed.items() if key in accepted and torch.is_tensor(value)}


def _feature_count(model: torch.nn.Module, pixels: dict[str, Any]) -> int:
    """How many image-token embeddings the model makes for these pixels, from its own `get_image_features`."""
    owner = model.model if hasattr(getattr(model, "model", None), "get_image_features") else model
    accepted = set(inspect.signature(owner.get_image_features).parameters)
    with torch.no_grad():
        output = owner.get_image_features(**{key: value for key, value in pixels.items() if key in accepted})
    features = getattr(output, "pooler_output", None)
    features = output if features is None else features
    if isinstance(features, (list, tuple)):
        return sum(feature.numel() for feature in features) // WIDTH
    return features.numel() // WIDTH


def _forward_names(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _generative_batch(
    model: torch.nn.Module, processor: Any, sizes: list[tuple[int, int]], override: Override
) -> Callable[[list[np.ndarray]], dict[str, Any]]:
    """A function from images to a training batch: prompt = [pad] + [start] + image tokens + [end] + text, labels on
    the last three text tokens."""
    config = model.config
    image_token = override.image_token if override.image_token is not None else _image_token_id(config)
    if image_token is None and override.image_tokens is None:
        override = dataclasses.replace(override, image_tokens=0)  # the model puts the image in front itself
    accepted = _forward_names(model)
    start = _first_token(
        config, ("vision_start_token_id", "image_start_token_id", "boi_token_id", "boi_token_index")
    )
    end = _first_token(
        config, ("vision_end_token_id", "image_end_token_id", "eoi_token_id", "eoi_token_index")
    )
    counts = [
        override.image_tokens
        if override.image_tokens is not None
        else _feature_count(model, _pixel_inputs(process(processor, [image]), accepted))
        for image in images(sizes)
    ]

    def make(pixels_images: list[np.ndarray]) -> dict[str, Any]:
        processed = process(processor, pixels_images)
        generator = torch.Generator().manual_seed(0)
        longest = max(counts)
        rows, labels = [], []
        for count in counts:
            text = torch.randint(4, SPECIAL_START - 10, (TEXT_LENGTH,), generator=generator).tolist()
            image = (
                ([start] if start is not None else [])
                + [image_token] * count
                + ([end] if end is not None else [])
            )
            row = [0] * (longest - count) + image + text
            rows.append(row)
            labels.append([-100] * (len(row) - 3) + text[-3:])
        input_ids = torch.tensor(rows)
        batch = {
            **_pixel_inputs(processed, accepted),
            "input_ids": input_ids,
            "attention_mask": (input_ids != 0).long(),
            "labels": torch.tensor(labels),
        }
        for name in ("token_type_ids", "mm_token_type_ids"):
            if name in accepted:
                batch[name] = (input_ids == image_token).long()
        for name, make_extra in override.extra_inputs.items():
            batch[name] = make_extra(batch, processed)
        return batch

    return make


def _dual_encoder_batch(
    model: torch.nn.Module, processor: Any
) -> Callable[[list[np.ndarray]], dict[str, Any]]:
    accepted = _forward_names(model)

    def make(pixels_images: list[np.ndarray]) -> dict[str, Any]:
        processed = process(processor, pixels_images)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(4, SPECIAL_START - 10, (len(pixels_images), 7), generator=generator)
        eos = getattr(getattr(model.config, "text_config", model.config), "eos_token_id", None)
        if isinstance(eos, int):
            input_ids[:, -1] = eos  # CLIP-style text towers pool at the end-of-text token
        batch = {**_pixel_inputs(processed, accepted), "input_ids": input_ids}
        if "attention_mask" in accepted:
            batch["attention_mask"] = torch.ones_like(input_ids)
        return batch

    return make


def _classifier_batch(model: torch.nn.Module, processor: Any) -> Callable[[list[np.ndarray]], dict[str, Any]]:
    accepted = _forward_names(model)

    def make(pixels_images: list[np.ndarray]) -> dict[str, Any]:
        processed = process(processor, pixels_images)
        return {**_pixel_inputs(processed, accepted), "labels": torch.arange(len(pixels_images)) % NUM_LABELS}

    return make


def _target_modules(model: torch.nn.Module, exclude: set[str]) -> str:
    """Every linear layer but the heads (as `all-linear` would), convolutions in a model with none: as a regex of
    full names, so a module whose name ends like a target's (`attention.output` and `output`) is not taken."""

    def layers(kind: type) -> list[str]:
        return [
            name
            for name, module in model.named_modules()
            # Exactly the class: subclasses with a forward of their own (an embedding table that is a Linear) are
            # not plain layers LoRA can wrap.
            if type(module) is kind and not any(name == e or name.startswith(e + ".") for e in exclude)
        ]

    # LoRA on a grouped convolution needs a rank divisible by its groups: depthwise convolutions are left out.
    names = layers(torch.nn.Linear) or [
        name for name in layers(torch.nn.Conv2d) if model.get_submodule(name).groups == 1
    ]
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def _loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    extra = {"return_loss": True} if "return_loss" in _forward_names(model) else {}
    return model(**batch, **extra).loss


def _connect_pixels(model: torch.nn.Module, batch: dict[str, Any]) -> None:
    """Some families start with the image cut off from the output (a zero projector, zero cross-attention gates),
    as a fresh model but no released checkpoint has them: where the loss ignores the pixels, the parameters that are
    exactly zero are opened (gates to 1, matrices to small random values)."""
    pixels = batch.get("pixel_values")
    if not torch.is_tensor(pixels) or not pixels.is_floating_point():
        _loss(model, batch).backward()  # no pixel_values: RAN refuses it, but the plain model must train
        return
    probe = pixels.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(
        _loss(model, {**batch, "pixel_values": probe}), [probe], allow_unused=True
    )
    if gradient is not None and bool(gradient.any()):
        return
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.numel() and not parameter.any() and not name.endswith("bias"):
                if parameter.numel() == 1:
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(std=0.5)


def _default_builds(family: RegistryFamily, head: type) -> bool:
    """Whether the family's head class builds from its unchanged default config (on the meta device: no memory).
    If not, the registry's own defaults are broken in this version, not the shrinking."""
    config_class = configuration_auto.CONFIG_MAPPING[family.model_type]
    try:
        with torch.device("meta"):
            head(config_class())
    except Exception:  # noqa: BLE001
        return False
    return True


def build_tiny(family: RegistryFamily) -> TinyFamily:
    override = OVERRIDES.get(family.model_type, Override())
    if override.not_buildable:
        raise NotBuildable(*override.not_buildable)
    head = _head_class(family)
    kind = kind_of(family)
    parameters = inspect.signature(head.forward).parameters
    if "pixel_values" not in parameters and not any(
        "pixel" in name or "image" in name for name in parameters
    ):
        raise NotBuildable(NO_IMAGE_INPUT, f"{head.__name__}.forward takes no image tensor")
    processor_class = image_processor_class(family, override)
    config, _, new_size = build_config(family, override)
    torch.manual_seed(0)
    try:
        model = head(config)
    except ImportError as error:
        raise NotBuildable(MISSING_DEPENDENCY, _import_error(error)) from error
    except Exception as error:  # noqa: BLE001
        if not _default_builds(family, head):
            raise NotBuildable(DEFAULT_BROKEN, f"{type(error).__name__}: {error}") from error
        raise NotBuildable(DOES_NOT_BUILD, f"model: {type(error).__name__}: {error}") from error
    count = sum(parameter.numel() for parameter in model.parameters())
    if count > MAX_PARAMETERS:
        raise NotBuildable(TOO_LARGE, f"{count / 1e6:.1f}M parameters after shrinking")
    for prepare in override.prepare_model:
        prepare(model)
    try:
        processor = build_image_processor(processor_class, override, config, new_size)
    except ImportError as error:
        raise NotBuildable(MISSING_DEPENDENCY, _import_error(error)) from error
    edge = new_size or 48
    # A square and a wide image: processors that keep aspect ratios pad the square one (NaFlex sequences, tiles,
    # image lists), so padding is exercised wherever the family has some. Processors that cannot batch images of
    # different sizes get two squares.
    tries = (
        [override.image_sizes]
        if override.image_sizes
        else [[(edge, edge), (edge, 2 * edge)], [(edge, edge)] * 2]
    )
    for attempt, sizes in enumerate(tries):
        try:
            if kind == "generative":
                make = _generative_batch(model, processor, sizes, override)
            elif kind == "dual_encoder":
                make = _dual_encoder_batch(model, processor)
            else:
                make = _classifier_batch(model, processor)
            batch = make(images(sizes))
            probes = tuple(make(solid(sizes, colour)) for colour in probe_colours())
            break
        except NotBuildable:
            raise
        except ImportError as error:
            raise NotBuildable(MISSING_DEPENDENCY, _import_error(error)) from error
        except Exception as error:  # noqa: BLE001
            if attempt == len(tries) - 1:
                raise NotBuildable(DOES_NOT_BUILD, f"batch: {type(error).__name__}: {error}") from error
    # Saved whole with the adapter, as with plain LoRA: a classifier's new head, and batch norms (their running
    # statistics change in training).
    heads = set(override.modules_to_save or [])
    if kind == "image_classifier":
        heads |= {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                  and module.out_features == NUM_LABELS}  # fmt: skip
    norms = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    }
    heads |= norms
    targets = override.target_modules or _target_modules(model, heads)
    if (
        targets == "^()$"
    ):  # no plain layer but the head (BiT's convolutions standardise their weights): LoRA on it
        targets, heads = _target_modules(model, norms), norms
    try:  # the plain model must train on this batch before RAN is asked to
        _connect_pixels(model, batch)
    except Exception as error:  # noqa: BLE001
        raise NotBuildable(DOES_NOT_BUILD, f"plain forward: {type(error).__name__}: {error}") from error
    return TinyFamily(
        family,
        kind,
        model,
        processor,
        batch,
        probes,
        targets,
        sorted(heads) or None,
        dict(override.recipe),
        count,
    )
