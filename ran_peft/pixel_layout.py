"""Where each element of a batch's `pixel_values` sits: its colour channel, and whether it is image or padding.

Every path that perturbs or checks pixels (the training attack, the evaluation attacks, noise crafting, the pixel-range
check) places its batch here, so none of them guesses where the channel axis is or perturbs padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ran_peft.pixels import PixelBox

# The names a user can state (RANConfig.pixel_layout, RANCallback(pixel_layout=...), evaluate_robustness(...)).
PIXEL_LAYOUTS = ("auto", "channels_first", "patch_rows", "patch_sequence")
"""The names `RANConfig.pixel_layout` accepts: `auto` recognises the layout from each batch."""

_HOW_TO_STATE = (
    "State the layout with RANConfig(pixel_layout=...) or RANCallback(pixel_layout=...): 'channels_first' for "
    "(..., C, H, W) images (padding from a `pixel_attention_mask` of shape (..., H, W)), 'patch_rows' for flattened "
    "patch rows (N, C*T*P*P) with `image_grid_thw` (Qwen2-VL style), 'patch_sequence' for NaFlex patch sequences "
    "(B, N, P*P*C) with `pixel_attention_mask` (B, N) (SigLIP2 style)."
)


class PixelLayoutError(ValueError):
    """RAN cannot tell where the channels or the padding of `pixel_values` are; the message says how to state it."""


def _layout_error(pixel_values: torch.Tensor, inputs: Mapping[str, Any], reason: str) -> PixelLayoutError:
    return PixelLayoutError(
        f"RAN cannot place the pixels of this batch: `pixel_values` has shape {tuple(pixel_values.shape)} and the "
        f"batch has keys {sorted(inputs)}. {reason} {_HOW_TO_STATE}"
    )


@dataclass(frozen=True, eq=False)
class PixelPlacement:
    """One batch's pixels placed: how a per-channel vector spreads over the elements, and which are real.

    A per-channel vector `v` (length C) becomes the per-element table `v.repeat_interleave(channel_repeat)
    .repeat(channel_tile)` viewed with `trailing_dims` singleton dims after it, which broadcasts to the pixels:
    `(C, 1, 1)` for `(..., C, H, W)` images, one patch row `(C*T*P*P,)` for Qwen-style rows, one patch `(P*P*C,)`
    for NaFlex sequences.
    """

    layout: str
    shape: tuple[int, ...]
    channels: int
    channel_repeat: int = 1
    channel_tile: int = 1
    trailing_dims: int = 0
    real: torch.Tensor | None = None  # bool, broadcastable to `shape`; None: every element is real
    sample_ndim: int | None = None  # trailing dims forming one sample (the L2 ball); None: not a fixed block
    sample_rows: tuple[int, ...] | None = None  # patch rows: rows of each image, in order

    def per_element(self, values: torch.Tensor) -> torch.Tensor:
        """A per-channel vector spread to a tensor that broadcasts to the pixels (a scalar for one channel)."""
        if values.numel() == 1:
            return values.reshape(())
        if values.numel() != self.channels:
            raise ValueError(
                f"a per-channel vector of {values.numel()} values does not fit the {self.channels} channels of "
                f"{self.layout} pixels of shape {self.shape}."
            )
        table = values.repeat_interleave(self.channel_repeat).repeat(self.channel_tile)
        return table.view(-1, *([1] * self.trailing_dims))

    def real_elements(self, device: torch.device | None = None) -> torch.Tensor:
        """The real-element mask expanded to the pixels' shape."""
        if self.real is None:
            return torch.ones(self.shape, dtype=torch.bool, device=device)
        return self.real.to(device).expand(self.shape)


class PixelLayout:
    """A kind of pixel layout: `place` checks one batch against it and says where its channels and padding are."""

    name = "base"

    def place(self, pixel_values: torch.Tensor, inputs: Mapping[str, Any], channels: int) -> PixelPlacement:
        """Where the channel axis and the padding of `pixel_values` are, given the batch's other `inputs` and the
        normalisation's number of `channels`; a batch that does not fit this layout is a `PixelLayoutError`."""
        raise NotImplementedError


@dataclass(frozen=True)
class ChannelsFirstLayout(PixelLayout):
    """Images of any rank `(..., C, H, W)`: CLIP, ViT, LLaVA(-NeXT) tiles, Mllama's 6-D tiles, Idefics3's padded
    image lists. Padding: in lists of images or tiles (5 or more dims), an all-zero image; a `pixel_attention_mask`
    (or `pixel_mask`) of shape `(..., H, W)` marks the real pixels (of shape `(...)` in image lists: the real
    images), an `aspect_ratio_mask` of shape `(...)` the real tiles (Mllama); `image_sizes` `(B, 2)` beside `(B, C, H, W)` images the real top-left region of each, when
    everything outside it is exactly 0 (how Pixtral-style processors pad a batch of images of different sizes).
    `fill`: the normalised colour the processor pads images with (`processor_fill`): whole rows and columns of that
    colour along the edges of an image or tile are padding (letterboxes, tiles padded to a grid, crops larger than
    the image)."""

    name = "channels_first"
    fill: tuple[float, ...] | None = None

    def place(self, pixel_values, inputs, channels):
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() < 3:
            raise _layout_error(pixel_values, inputs, "Channel-first images need at least 3 dims (C, H, W).")
        if channels > 1 and shape[-3] != channels:
            raise _layout_error(
                pixel_values,
                inputs,
                f"As channel-first images they would have {shape[-3]} channels at dim -3, but the pixel "
                f"normalisation has {channels} (mean/std per channel).",
            )
        real = None
        if pixel_values.dim() >= 5:
            # Lists of images or tiles per sample (Idefics2/3, SmolVLM, LLaVA-NeXT, Mllama): processors pad them with
            # images that are exactly 0 everywhere, which the models skip (Idefics3 finds its real images this
            # way); a real image is never exactly the mean colour in every pixel.
            real = pixel_values.ne(0).flatten(-3).any(-1)[..., None, None, None]
        image_mask = inputs.get("aspect_ratio_mask")  # Mllama: which tiles of each image are real
        if torch.is_tensor(image_mask):
            if tuple(image_mask.shape) != shape[:-3]:
                raise _layout_error(
                    pixel_values,
                    inputs,
                    f"Its `aspect_ratio_mask` has shape {tuple(image_mask.shape)}, but a mask of real tiles has "
                    f"shape {shape[:-3]} (the pixels' leading dims).",
                )
            tiles = image_mask.bool()[..., None, None, None]
            real = tiles if real is None else real & tiles
        for key in _PIXEL_MASK_KEYS:
            mask = inputs.get(key)
            if not torch.is_tensor(mask):
                continue
            if tuple(mask.shape) == shape[:-3] + shape[-2:]:  # per pixel
                pixel_mask = mask.bool().unsqueeze(-3)
            elif pixel_values.dim() >= 5 and tuple(mask.shape) == shape[:-3]:  # per image of an image list
                pixel_mask = mask.bool()[..., None, None, None]
            else:
                raise _layout_error(
                    pixel_values,
                    inputs,
                    f"Its `{key}` has shape {tuple(mask.shape)}, but channel-first padding masks have shape "
                    f"{shape[:-3] + shape[-2:]} (per pixel: the pixels without the channel dim)"
                    + (f" or {shape[:-3]} (per image)." if pixel_values.dim() >= 5 else "."),
                )
            real = pixel_mask if real is None else real & pixel_mask
        for found in (_sized_region(pixel_values, inputs), _fill_sites(pixel_values, self.fill)):
            if found is not None:
                real = found if real is None else real & found
        return PixelPlacement(self.name, shape, channels, trailing_dims=2, real=real, sample_ndim=3)


# Keys that mark real pixels (1) and padding (0), per pixel of channel-first images.
_PIXEL_MASK_KEYS = ("pixel_attention_mask", "pixel_mask")


def _sized_region(pixel_values: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The real top-left `(h, w)` region of each `(B, C, H, W)` image that `image_sizes` `(B, 2)` gives, if everything
    outside it is exactly 0 (then it is the zero padding a batch of images of different sizes gets). Sizes that are
    something else (the original image sizes of tiled processors) leave no such zero margin and are not used."""
    sizes = inputs.get("image_sizes")
    if (
        pixel_values.dim() != 4
        or not torch.is_tensor(sizes)
        or tuple(sizes.shape) != (pixel_values.shape[0], 2)
    ):
        return None
    height, width = pixel_values.shape[-2:]
    if bool((sizes[:, 0] > height).any()) or bool((sizes[:, 1] > width).any()) or bool((sizes <= 0).any()):
        return None
    rows = torch.arange(height, device=pixel_values.device)[None, :, None] < sizes[:, 0, None, None]
    columns = torch.arange(width, device=pixel_values.device)[None, None, :] < sizes[:, 1, None, None]
    region = (rows & columns).unsqueeze(1)  # (B, 1, H, W)
    if bool(region.all()) or bool(pixel_values.masked_fill(region, 0).any()):
        return None
    return region


def _edge_bands(rows: torch.Tensor) -> torch.Tensor:
    """Along the last dim: True for the run of Trues at each end (a band along an edge)."""
    from_start = rows.long().cumprod(-1).bool()
    from_end = rows.flip(-1).long().cumprod(-1).bool().flip(-1)
    return from_start | from_end


def _fill_sites(pixel_values: torch.Tensor, fill: tuple[float, ...] | None) -> torch.Tensor | None:
    """Where the processor padded: whole rows and columns along the edges of each image or tile whose every pixel
    has the processor's fill colour in every channel (to float32 rounding), or None when there are none. Only edge
    bands count, so a real image's own pixels of that colour are attacked as any other."""
    if fill is None or pixel_values.dim() < 3 or len(fill) not in (1, pixel_values.shape[-3]):
        return None
    colour = torch.tensor(fill, dtype=torch.float32, device=pixel_values.device).view(-1, 1, 1)
    tolerance = 1e-5 * (1 + colour.abs())
    at_fill = ((pixel_values.float() - colour).abs() <= tolerance).all(dim=-3)  # (..., H, W)
    rows = _edge_bands(at_fill.all(-1))[..., :, None]  # (..., H, 1)
    columns = _edge_bands(at_fill.all(-2))[..., None, :]  # (..., 1, W)
    padding = rows | columns
    return ~padding.unsqueeze(-3) if bool(padding.any()) else None


@dataclass(frozen=True)
class PatchRowLayout(PixelLayout):
    """Flattened patch rows `(N, C*T*P*P)` with `image_grid_thw` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V ...): each
    row holds one patch, channel-major (C, then T frames, then the P x P pixels); images differ in row counts."""

    name = "patch_rows"
    patch_size: int | None = None
    temporal_patch_size: int | None = None

    def place(self, pixel_values, inputs, channels):
        shape = tuple(pixel_values.shape)
        grid = inputs.get("image_grid_thw")
        if pixel_values.dim() != 2 or not torch.is_tensor(grid):
            raise _layout_error(
                pixel_values, inputs, "Patch rows are a 2-D (N, C*T*P*P) tensor beside `image_grid_thw`."
            )
        rows = [int(value) for value in grid.prod(dim=-1).tolist()]
        if sum(rows) != shape[0]:
            raise _layout_error(
                pixel_values,
                inputs,
                f"`image_grid_thw` {grid.tolist()} counts {sum(rows)} patch rows, not {shape[0]}.",
            )
        width = shape[1]
        if self.patch_size is not None and self.temporal_patch_size is not None:
            expected = max(channels, 1) * self.temporal_patch_size * self.patch_size**2
            if channels > 1 and width != expected:
                raise _layout_error(
                    pixel_values,
                    inputs,
                    f"The processor's patch_size={self.patch_size} and temporal_patch_size="
                    f"{self.temporal_patch_size} with {channels} channels make rows of {expected} values, not "
                    f"{width}.",
                )
        if width % max(channels, 1):
            raise _layout_error(
                pixel_values, inputs, f"A row of {width} values does not split into {channels} channels."
            )
        return PixelPlacement(
            self.name, shape, channels, channel_repeat=width // max(channels, 1), sample_rows=tuple(rows)
        )


@dataclass(frozen=True)
class PatchSequenceLayout(PixelLayout):
    """NaFlex patch sequences `(B, N, P*P*C)` (SigLIP2, Gemma 4 and models built on them): each patch is P x P pixels
    with the channel fastest. Padding patches: where `pixel_attention_mask` `(B, N)` is 0, where a patch position
    id (a `..._position_ids` tensor of shape `(B, N)` or `(B, N, k)`) is negative, and patches that are exactly 0
    everywhere (what processors pad sequences with)."""

    name = "patch_sequence"
    patch_size: int | None = None

    def place(self, pixel_values, inputs, channels):
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() != 3:
            raise _layout_error(pixel_values, inputs, "NaFlex patch sequences are 3-D (B, N, P*P*C).")
        width = shape[-1]
        if channels > 1 and self.patch_size is not None and width != self.patch_size**2 * channels:
            raise _layout_error(
                pixel_values,
                inputs,
                f"The processor's patch_size={self.patch_size} with {channels} channels makes patches of "
                f"{self.patch_size**2 * channels} values, not {width}.",
            )
        if width % max(channels, 1):
            raise _layout_error(
                pixel_values, inputs, f"A patch of {width} values does not split into {channels} channels."
            )
        real = None
        mask = inputs.get("pixel_attention_mask")
        if torch.is_tensor(mask):
            if tuple(mask.shape) != shape[:2]:
                raise _layout_error(
                    pixel_values,
                    inputs,
                    f"Its `pixel_attention_mask` has shape {tuple(mask.shape)}, not (B, N) = {shape[:2]}.",
                )
            real = mask.bool().unsqueeze(-1)
        positions = _patch_positions(pixel_values, inputs)
        if positions is not None:
            real_positions = (positions >= 0).reshape(*shape[:2], -1).all(-1).unsqueeze(-1)
            real = real_positions if real is None else real & real_positions
        nonzero = pixel_values.ne(0).any(-1, keepdim=True)
        if not bool(nonzero.all()):
            real = nonzero if real is None else real & nonzero
        return PixelPlacement(
            self.name, shape, channels, channel_tile=width // max(channels, 1), real=real, sample_ndim=2
        )


def _patch_positions(pixel_values: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """The batch's patch position ids for 3-D `(B, N, D)` pixels: an integer `..._position_ids` tensor of shape
    `(B, N)` or `(B, N, k)` (Gemma 4's `image_position_ids`, -1 on padding patches), or None."""
    if pixel_values.dim() != 3:
        return None
    for key, value in inputs.items():
        if (
            key.endswith("position_ids")
            and key != "position_ids"  # the text's positions
            and torch.is_tensor(value)
            and not value.is_floating_point()
            and value.dim() in (2, 3)
            and tuple(value.shape[:2]) == tuple(pixel_values.shape[:2])
        ):
            return value
    return None


_BY_NAME = {layout.name: layout for layout in (ChannelsFirstLayout, PatchRowLayout, PatchSequenceLayout)}


def layout_from_processor(processor: Any) -> PixelLayout | None:
    """The layout a processor's attributes announce, or None when they announce none in particular.

    A temporal patch size with a merge size means flattened patch rows (Qwen2-VL's image processor and its kin); a
    patch budget (`max_num_patches`) with a patch size means NaFlex sequences (SigLIP2's).
    """
    if processor is None:
        return None
    for candidate in (getattr(processor, "image_processor", None), processor):
        if candidate is None:
            continue
        patch_size = getattr(candidate, "patch_size", None)
        if getattr(candidate, "temporal_patch_size", None) is not None and getattr(
            candidate, "merge_size", None
        ):
            return PatchRowLayout(patch_size, candidate.temporal_patch_size)
        if getattr(candidate, "max_num_patches", None) is not None and patch_size is not None:
            return PatchSequenceLayout(patch_size)
    return None


def unattacked_pixel_keys(inputs: Mapping[str, Any]) -> list[str]:
    """The batch's other pixel tensors, which RAN leaves clean: every floating-point tensor whose key holds
    `pixel_values` but is not `pixel_values` itself (`pixel_values_videos`, `high_res_pixel_values`, ...)."""
    return sorted(
        key
        for key, value in inputs.items()
        if key != "pixel_values"
        and "pixel_values" in key
        and torch.is_tensor(value)
        and value.is_floating_point()
    )


def _size_edge(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return value if isinstance(value, int) else None


def _crop_pads(processor: Any) -> bool:
    """Whether the processor's centre crop is larger than the images it resizes to (it then pads them)."""
    if not getattr(processor, "do_center_crop", False):
        return False
    crop, size = getattr(processor, "crop_size", None), getattr(processor, "size", None)
    shortest = _size_edge(size, "shortest_edge")
    edges = [_size_edge(crop, "height"), _size_edge(crop, "width")]
    return shortest is not None and any(edge is not None and edge > shortest for edge in edges)


def processor_fill(processor: Any) -> tuple[float, ...] | None:
    """The normalised colour a processor pads images with, when it pads them itself: its `background_color` with
    `do_pad` (squares, letterboxes), black with `do_pad` and no colour (tiles padded to a grid), or black where its
    centre crop is larger than its resized images. None when it does not pad."""
    if processor is None:
        return None
    for candidate in (getattr(processor, "image_processor", None), processor):
        if candidate is None or getattr(candidate, "image_mean", None) is None:
            continue
        colour = getattr(candidate, "background_color", None)
        if not getattr(candidate, "do_pad", False):
            if not _crop_pads(candidate):
                continue
            colour = None
        if not isinstance(colour, (tuple, list)) or not colour:
            colour = (0,)
        box = PixelBox.from_processor(candidate)
        mean = box.mean * (len(colour) if len(box.mean) == 1 else 1)
        std = box.std * (len(colour) if len(box.std) == 1 else 1)
        colour = tuple(colour) * (len(mean) if len(colour) == 1 else 1)
        return tuple((value / 255 - m) / s for value, m, s in zip(colour, mean, std, strict=False))
    return None


def _layout_from_batch(pixel_values: torch.Tensor, inputs: Mapping[str, Any]) -> PixelLayout:
    if pixel_values.dim() == 2:
        if "image_grid_thw" in inputs:
            return PatchRowLayout()
        raise _layout_error(
            pixel_values, inputs, "2-D pixels are patch rows, but the batch has no `image_grid_thw`."
        )
    if pixel_values.dim() == 3:
        mask = inputs.get("pixel_attention_mask")
        naflex_mask = torch.is_tensor(mask) and tuple(mask.shape) == tuple(pixel_values.shape[:2])
        if "spatial_shapes" in inputs or naflex_mask or _patch_positions(pixel_values, inputs) is not None:
            return PatchSequenceLayout()
        # (3, N, D) could be a batch of patch sequences read as one RGB image: never guess (a wrong guess is a
        # silently wrong budget).
        raise _layout_error(
            pixel_values,
            inputs,
            "3-D pixels are either one unbatched (C, H, W) image or NaFlex patch sequences (B, N, P*P*C), and the "
            "batch has neither `spatial_shapes`, nor a (B, N) `pixel_attention_mask`, nor (B, N) patch position ids "
            "to tell them apart.",
        )
    if pixel_values.dim() >= 4:
        return ChannelsFirstLayout()
    raise _layout_error(pixel_values, inputs, "Pixels need at least 2 dims.")


def _with_fill(layout: PixelLayout, processor: Any) -> PixelLayout:
    fill = processor_fill(processor)
    if fill is not None and isinstance(layout, ChannelsFirstLayout) and layout.fill is None:
        return ChannelsFirstLayout(fill=fill)
    return layout


def _patches_of(pixel_values: torch.Tensor, inputs: Mapping[str, Any], rows: PatchRowLayout) -> bool:
    """Whether 4-D pixels are the processor's patches kept as `(N, C, P, P)` images (PaddleOCR-VL) rather than
    flattened into rows: one per patch that `image_grid_thw` counts, each as large as the processor's patch."""
    grid = inputs.get("image_grid_thw")
    if pixel_values.dim() != 4 or not torch.is_tensor(grid) or rows.patch_size is None:
        return False
    count = int(grid.prod(dim=-1).sum())
    return pixel_values.shape[0] == count and tuple(pixel_values.shape[-2:]) == (
        rows.patch_size,
        rows.patch_size,
    )


def resolve_pixel_layout(
    layout: str | PixelLayout | None, inputs: Mapping[str, Any], processor: Any = None
) -> PixelLayout:
    """The layout of this batch: the one stated (a name or a `PixelLayout`), else recognised from the batch's keys
    and shapes, with the processor's attributes (patch sizes) where it announces the same layout."""
    if isinstance(layout, PixelLayout):
        return layout
    layout = "auto" if layout is None else layout
    if layout not in PIXEL_LAYOUTS:
        raise ValueError(
            f"pixel_layout={layout!r} is not a known pixel layout; allowed: {', '.join(PIXEL_LAYOUTS)}."
        )
    announced = layout_from_processor(processor)
    if layout != "auto":
        stated = _BY_NAME[layout]
        found = announced if isinstance(announced, stated) else stated()
        return _with_fill(found, processor)
    pixel_values = inputs["pixel_values"]
    found = _layout_from_batch(pixel_values, inputs)
    if announced is None:
        return _with_fill(found, processor)
    if (
        isinstance(announced, PatchRowLayout)
        and isinstance(found, ChannelsFirstLayout)
        and _patches_of(pixel_values, inputs, announced)
    ):
        return found
    if type(announced) is not type(found):
        raise _layout_error(
            pixel_values,
            inputs,
            f"The processor announces {announced.name} pixels but the batch looks like {found.name}.",
        )
    return announced


@dataclass(frozen=True, eq=False)
class BatchPixelBox:
    """The pixel box of one batch: the normalisation (`PixelBox`) spread over the batch's elements by its layout.

    `mean`, `std`, `lower`, `upper` are float32 tensors that broadcast to the pixels; `placement.real` marks the
    elements that are not padding. This is what the attack and the range check use.
    """

    box: PixelBox
    placement: PixelPlacement
    mean: torch.Tensor
    std: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @classmethod
    def place(
        cls,
        box: PixelBox,
        inputs: Mapping[str, Any],
        layout: str | PixelLayout | None = "auto",
        processor: Any = None,
    ) -> BatchPixelBox:
        """Place `box` over `inputs["pixel_values"]` (see `resolve_pixel_layout`)."""
        pixel_values = inputs["pixel_values"]
        placement = resolve_pixel_layout(layout, inputs, processor).place(pixel_values, inputs, box.channels)
        device = pixel_values.device

        def spread(values: tuple[float, ...]) -> torch.Tensor:
            return placement.per_element(torch.tensor(values, dtype=torch.float32, device=device))

        mean, std = spread(box.mean), spread(box.std)
        return cls(box, placement, mean, std, (0.0 - mean) / std, (1.0 - mean) / std)

    @property
    def real(self) -> torch.Tensor | None:
        """The mask of real (non-padding) elements, broadcastable to the pixels; None when all are real."""
        return self.placement.real

    def kernel_arguments(self) -> dict[str, Any]:
        """What `ran_peft.kernels.pgd_step` / `pgd_random_start` need besides the budgets."""
        return {
            "std": self.std,
            "lower": self.lower,
            "upper": self.upper,
            "real": None if self.real is None else self.real.to(self.std.device),
            "sample_ndim": self.placement.sample_ndim,
        }

    def to_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised values back to [0, 1] pixel units (float32)."""
        return pixel_values.float() * self.std + self.mean

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels in the batch's layout to the model's normalised values."""
        return (pixels.float() - self.mean) / self.std

    def linf_in_pixels(self, delta: torch.Tensor) -> torch.Tensor:
        """The L-infinity size of a normalised perturbation in pixel units over the real elements, per sample:
        per image for channel-first images and patch rows, per sequence for NaFlex."""
        size = (delta.float() * self.std).abs()
        size = size.masked_fill(~self.placement.real_elements(delta.device), 0.0)
        if self.placement.sample_rows is not None:
            return torch.stack([rows.amax() for rows in size.split(list(self.placement.sample_rows))])
        ndim = self.placement.sample_ndim or size.dim()
        return size.flatten(size.dim() - ndim).amax(-1)

    def channel_ranges(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the smallest and largest of `values` (shaped like the pixels) over the real elements."""
        channels = max(self.box.channels, 1)
        index = self.placement.per_element(torch.arange(channels, device=values.device))
        index = index.expand(values.shape) if index.dim() else torch.zeros_like(values, dtype=torch.long)
        real = self.placement.real_elements(values.device)
        index, picked = index[real], values.float()[real]
        low = torch.full((channels,), float("inf"), device=values.device)
        high = torch.full((channels,), float("-inf"), device=values.device)
        return low.scatter_reduce(0, index, picked, "amin"), high.scatter_reduce(0, index, picked, "amax")
