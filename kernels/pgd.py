"""Projected-gradient-descent update and random start for adversarial images, fused in Triton.

Each Triton kernel sits beside a plain-PyTorch reference with the same signature. Neither assumes a pixel layout:
`std`, `lower` and `upper` are per-element (any tensor broadcastable to the pixels), `real` marks the elements that
may move (padding never does), and `sample_ndim` says which trailing dims form one sample for the L2 ball.
"""

from __future__ import annotations

import math

import torch

from .dispatch import jit, kernel_backend, load_triton

# Bound to ``triton.language`` on the first Triton launch, so importing this module never needs triton.
tl = None

NORMS = ("linf", "l2")
_BLOCK = 1024
_TINY = 1e-12


# --------------------------------------------------------------------------------------------------
# Shared checks and per-element helpers
# --------------------------------------------------------------------------------------------------


def _check_bounds(
    name: str,
    tensor: torch.Tensor,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    real: torch.Tensor | None,
    sample_ndim: int | None,
) -> None:
    shape = tuple(tensor.shape)
    operands = {"std": std, "lower": lower, "upper": upper}
    if real is not None:
        operands["real"] = real
    for operand_name, operand in operands.items():
        try:
            fits = torch.broadcast_shapes(tuple(operand.shape), shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{operand_name} must broadcast to {name}'s shape {shape} (one value per element, or per channel "
                f"placed where the channel axis is, e.g. shape (C, 1, 1) for (..., C, H, W) images); got shape "
                f"{tuple(operand.shape)}"
            )
    if real is not None and real.dtype != torch.bool:
        raise ValueError(f"real must be a bool tensor (True where a pixel is not padding); got {real.dtype}")
    if sample_ndim is not None and (
        isinstance(sample_ndim, bool)
        or not isinstance(sample_ndim, int)
        or not 1 <= sample_ndim <= len(shape)
    ):
        raise ValueError(
            f"sample_ndim={sample_ndim!r} must be an integer in [1, {len(shape)}] (the trailing dims of {name} that "
            "form one sample)"
        )


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; allowed values are {', '.join(NORMS)}")


def _check_step(delta, grad, clean, std, lower, upper, norm, real, sample_ndim) -> None:
    _check_norm(norm)
    _check_bounds("delta", delta, std, lower, upper, real, sample_ndim)
    for name, other in (("grad", grad), ("clean", clean)):
        if other.shape != delta.shape:
            raise ValueError(f"{name} must have delta's shape {tuple(delta.shape)}; got {tuple(other.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision images are updated in float32 and rounded once at the end.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_element(operand: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return operand.to(device=like.device, dtype=dtype)


def _sample_numel(shape: torch.Size, sample_ndim: int | None) -> int:
    """Elements per sample: the last `sample_ndim` dims; None means an image, the last three (or all, if fewer)."""
    ndim = min(3, len(shape)) if sample_ndim is None else sample_ndim
    return math.prod(shape[len(shape) - ndim :])


def _sample_view(tensor: torch.Tensor, sample_ndim: int | None) -> torch.Tensor:
    """(..., *sample) -> (S, prod(sample)): one row per sample (for channel-first images, one (C, H, W) image)."""
    return tensor.reshape(-1, _sample_numel(tensor.shape, sample_ndim))


def _keep_padding(
    new: torch.Tensor, adv: torch.Tensor, clean: torch.Tensor, real: torch.Tensor | None
) -> None:
    """Padding elements keep their clean value: zero delta, adversarial == clean (in place)."""
    if real is None:
        return
    real = real.to(new.device)
    new.masked_fill_(~real.expand(new.shape), 0)
    torch.where(real, adv, clean.to(adv.dtype), out=adv)


# --------------------------------------------------------------------------------------------------
# PGD step: references
# --------------------------------------------------------------------------------------------------


def pgd_step_reference(
    delta: torch.Tensor,
    grad: torch.Tensor,
    clean: torch.Tensor,
    *,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    epsilon: float,
    step_size: float,
    norm: str = "linf",
    real: torch.Tensor | None = None,
    sample_ndim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD ascent step in normalised pixel units; returns ``(new_delta, adversarial_input)``.

    ``epsilon`` and ``step_size`` are in [0, 1] pixel units; an element's budget in normalised units is
    ``epsilon / std`` at that element (``std``, ``lower``, ``upper`` broadcast to ``delta``). linf: sign step,
    clamp to the per-element box; l2: normalised step and projection onto the per-sample L2 ball (a sample is the
    last ``sample_ndim`` dims; None: an image, the last three), both in pixel units. Then ``clean + delta`` is clamped to ``[lower, upper]``.
    Where ``real`` is False (padding), delta stays 0 and the element counts in no norm.
    """
    _check_step(delta, grad, clean, std, lower, upper, norm, real, sample_ndim)
    dtype = _compute_dtype(delta.dtype)
    std_e = _per_element(std, delta, dtype)
    lower_e = _per_element(lower, delta, dtype)
    upper_e = _per_element(upper, delta, dtype)

    if norm == "linf":
        budget = epsilon / std_e
        # One fresh buffer holds the step, then the new delta; every later op is in place.
        new = torch.sign(grad).to(dtype)
        new.mul_(step_size / std_e).add_(delta)
        torch.clamp(new, min=-budget, max=budget, out=new)
    else:
        grad_pix = grad.to(dtype) / std_e
        new = delta.to(dtype) * std_e
        if real is not None:
            grad_pix.masked_fill_(~real.to(delta.device).expand(delta.shape), 0)
            new.masked_fill_(~real.to(delta.device).expand(delta.shape), 0)
        grad_rows, new_rows = _sample_view(grad_pix, sample_ndim), _sample_view(new, sample_ndim)
        grad_norm = torch.linalg.vector_norm(grad_rows, dim=1, keepdim=True)
        new_rows.add_(grad_rows.mul_(step_size / (grad_norm + _TINY)))
        radius = torch.linalg.vector_norm(new_rows, dim=1, keepdim=True)
        shrink = torch.where(radius > epsilon, epsilon / radius.clamp_min(_TINY), torch.ones_like(radius))
        new_rows.mul_(shrink)
        new = new_rows.view(delta.shape).div_(std_e)

    adv = torch.add(clean, new)
    torch.clamp(adv, min=lower_e, max=upper_e, out=adv)
    torch.sub(adv, clean, out=new)
    _keep_padding(new, adv, clean, real)
    return new.to(delta.dtype), adv.to(delta.dtype)


def pgd_random_start_reference(
    clean: torch.Tensor,
    *,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    epsilon: float,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    real: torch.Tensor | None = None,
    sample_ndim: int | None = None,
) -> torch.Tensor:
    """A random initial perturbation inside the budget, with ``clean + delta`` inside the box.

    linf: uniform in ``[-epsilon, epsilon]`` pixel units per element; l2: a uniformly random direction per sample
    (the last ``sample_ndim`` dims, padding excluded) with radius ``epsilon * U(0, 1)`` pixel units. Padding
    (``real`` False) stays at 0.
    """
    _check_norm(norm)
    _check_bounds("clean", clean, std, lower, upper, real, sample_ndim)
    dtype = _compute_dtype(clean.dtype)
    std_e = _per_element(std, clean, dtype)
    device = generator.device if generator is not None else clean.device
    if norm == "linf":
        pix = torch.rand(clean.shape, generator=generator, device=device, dtype=dtype).to(clean.device)
        pix.mul_(2 * epsilon).sub_(epsilon)
    else:
        pix = torch.randn(clean.shape, generator=generator, device=device, dtype=dtype).to(clean.device)
        if real is not None:
            pix.masked_fill_(~real.to(clean.device).expand(clean.shape), 0)
        rows = _sample_view(pix, sample_ndim)
        radius = epsilon * torch.rand(rows.shape[0], generator=generator, device=device, dtype=dtype)
        length = torch.linalg.vector_norm(rows, dim=1).clamp_min(_TINY)
        rows.mul_((radius.to(clean.device) / length).view(-1, 1))
    delta = pix.div_(std_e)
    adv = torch.add(clean, delta)
    torch.clamp(adv, min=_per_element(lower, clean, dtype), max=_per_element(upper, clean, dtype), out=adv)
    torch.sub(adv, clean, out=delta)
    if real is not None:
        delta.masked_fill_(~real.to(clean.device).expand(clean.shape), 0)
    return delta.to(clean.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels (plain functions, compiled by ``dispatch.jit`` on first launch)
#
# A per-element operand (std, lower, upper, real) is passed compactly as (values, inner, period): element i reads
# values[(i // inner) % period]. Every broadcast whose non-singleton dims are adjacent has that form (a channel
# vector (C, 1, 1) over (..., C, H, W) images, a row table over patch rows, a patch mask over patch sequences);
# other broadcasts are expanded once per call (`_operand`).
# --------------------------------------------------------------------------------------------------


def _pgd_linf_kernel(
    delta_ptr,
    grad_ptr,
    clean_ptr,
    std_ptr,
    lower_ptr,
    upper_ptr,
    real_ptr,
    new_delta_ptr,
    adv_ptr,
    n_elements,
    std_inner,
    std_period,
    box_inner,
    box_period,
    real_inner,
    real_period,
    epsilon,
    step_size,
    BLOCK: tl.constexpr,
):
    # Reads grad, delta and clean once, writes new delta and adv once.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    std = tl.load(std_ptr + (offs // std_inner) % std_period, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    real = tl.load(real_ptr + (offs // real_inner) % real_period, mask=inside, other=0) != 0
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)

    sign = tl.where(grad > 0, 1.0, 0.0) - tl.where(grad < 0, 1.0, 0.0)
    budget = epsilon / std
    delta = delta + (step_size / std) * sign
    delta = tl.minimum(tl.maximum(delta, -budget), budget)
    adv = tl.minimum(tl.maximum(clean + delta, lower), upper)
    adv = tl.where(real, adv, clean)
    tl.store(new_delta_ptr + offs, (adv - clean).to(new_delta_ptr.dtype.element_ty), mask=inside)
    tl.store(adv_ptr + offs, adv.to(adv_ptr.dtype.element_ty), mask=inside)


def _pgd_l2_sums_kernel(
    delta_ptr,
    grad_ptr,
    std_ptr,
    real_ptr,
    partial_ptr,
    sample_numel,
    std_inner,
    std_period,
    real_inner,
    real_period,
    n_samples,
    n_blocks,
    BLOCK: tl.constexpr,
):
    # Per (sample, block): sum g_pix^2, sum d_pix^2, sum d_pix * g_pix, in pixel units, over real elements.
    sample = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    local = block * BLOCK + tl.arange(0, BLOCK)
    inside = local < sample_numel
    offs = sample * sample_numel + local
    std = tl.load(std_ptr + (offs // std_inner) % std_period, mask=inside, other=1.0)
    real = tl.load(real_ptr + (offs // real_inner) % real_period, mask=inside, other=0) != 0
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32) / std
    delta = tl.load(delta_ptr + offs, mask=inside, other=0.0).to(tl.float32) * std
    grad = tl.where(real, grad, 0.0)
    delta = tl.where(real, delta, 0.0)
    out = sample * n_blocks + block
    tl.store(partial_ptr + out, tl.sum(grad * grad, axis=0))
    tl.store(partial_ptr + n_samples * n_blocks + out, tl.sum(delta * delta, axis=0))
    tl.store(partial_ptr + 2 * n_samples * n_blocks + out, tl.sum(delta * grad, axis=0))


def _pgd_l2_update_kernel(
    delta_ptr,
    grad_ptr,
    clean_ptr,
    std_ptr,
    lower_ptr,
    upper_ptr,
    real_ptr,
    grad_scale_ptr,
    shrink_ptr,
    new_delta_ptr,
    adv_ptr,
    n_elements,
    sample_numel,
    std_inner,
    std_period,
    box_inner,
    box_period,
    real_inner,
    real_period,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    sample = offs // sample_numel
    std = tl.load(std_ptr + (offs // std_inner) % std_period, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    real = tl.load(real_ptr + (offs // real_inner) % real_period, mask=inside, other=0) != 0
    grad_scale = tl.load(grad_scale_ptr + sample, mask=inside, other=0.0)
    shrink = tl.load(shrink_ptr + sample, mask=inside, other=0.0)
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)

    delta_pix = (delta * std + grad_scale * (grad / std)) * shrink
    adv = tl.minimum(tl.maximum(clean + delta_pix / std, lower), upper)
    adv = tl.where(real, adv, clean)
    tl.store(new_delta_ptr + offs, (adv - clean).to(new_delta_ptr.dtype.element_ty), mask=inside)
    tl.store(adv_ptr + offs, adv.to(adv_ptr.dtype.element_ty), mask=inside)


def _random_linf_kernel(
    clean_ptr,
    std_ptr,
    lower_ptr,
    upper_ptr,
    real_ptr,
    out_ptr,
    n_elements,
    std_inner,
    std_period,
    box_inner,
    box_period,
    real_inner,
    real_period,
    epsilon,
    seed,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    std = tl.load(std_ptr + (offs // std_inner) % std_period, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    real = tl.load(real_ptr + (offs // real_inner) % real_period, mask=inside, other=0) != 0
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    delta = (tl.rand(seed, offs) * 2.0 - 1.0) * (epsilon / std)
    adv = tl.minimum(tl.maximum(clean + delta, lower), upper)
    adv = tl.where(real, adv, clean)
    tl.store(out_ptr + offs, (adv - clean).to(out_ptr.dtype.element_ty), mask=inside)


def _randn_kernel(real_ptr, out_ptr, n_elements, real_inner, real_period, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    real = tl.load(real_ptr + (offs // real_inner) % real_period, mask=inside, other=0) != 0
    tl.store(out_ptr + offs, tl.where(real, tl.randn(seed, offs), 0.0), mask=inside)


def _random_l2_finish_kernel(
    direction_ptr,
    clean_ptr,
    std_ptr,
    lower_ptr,
    upper_ptr,
    real_ptr,
    scale_ptr,
    out_ptr,
    n_elements,
    sample_numel,
    std_inner,
    std_period,
    box_inner,
    box_period,
    real_inner,
    real_period,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    std = tl.load(std_ptr + (offs // std_inner) % std_period, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + (offs // box_inner) % box_period, mask=inside, other=0.0)
    real = tl.load(real_ptr + (offs // real_inner) % real_period, mask=inside, other=0) != 0
    scale = tl.load(scale_ptr + offs // sample_numel, mask=inside, other=0.0)
    direction = tl.load(direction_ptr + offs, mask=inside, other=0.0)
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    adv = tl.minimum(tl.maximum(clean + direction * scale / std, lower), upper)
    adv = tl.where(real, adv, clean)
    tl.store(out_ptr + offs, (adv - clean).to(out_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------


def _bind_triton():
    global tl
    triton, tl = load_triton()
    return triton


def _operand(
    operand: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, int, int]:
    """A per-element operand broadcast to ``like`` as ``(values, inner, period)``: element i is
    ``values[(i // inner) % period]``. None (no mask) is a single True."""
    if operand is None:
        return torch.ones(1, device=like.device, dtype=dtype), 1, 1
    shape = tuple(like.shape)
    aligned = operand.reshape((1,) * (len(shape) - operand.dim()) + tuple(operand.shape))
    varying = [dim for dim in range(len(shape)) if aligned.shape[dim] != 1]
    if not varying:
        return aligned.reshape(1).to(device=like.device, dtype=dtype).contiguous(), 1, 1
    first, last = varying[0], varying[-1]
    if all(aligned.shape[dim] == shape[dim] for dim in range(first, last + 1)):
        period = math.prod(shape[first : last + 1])
        values = aligned.reshape(period).to(device=like.device, dtype=dtype).contiguous()
        return values, math.prod(shape[last + 1 :]), period
    values = aligned.expand(shape).reshape(-1).to(device=like.device, dtype=dtype).contiguous()
    return values, 1, values.numel()


def _operands(like, std, lower, upper, real):
    std_t, std_inner, std_period = _operand(std, like, torch.float32)
    lower_b, upper_b = torch.broadcast_tensors(lower, upper)
    lower_t, box_inner, box_period = _operand(lower_b, like, torch.float32)
    upper_t, _, _ = _operand(upper_b, like, torch.float32)
    real_t, real_inner, real_period = _operand(real, like, torch.int8)
    return (std_t, lower_t, upper_t, real_t), (
        std_inner,
        std_period,
        box_inner,
        box_period,
        real_inner,
        real_period,
    )


def _seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())


def pgd_step_triton(
    delta: torch.Tensor,
    grad: torch.Tensor,
    clean: torch.Tensor,
    *,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    epsilon: float,
    step_size: float,
    norm: str = "linf",
    real: torch.Tensor | None = None,
    sample_ndim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`pgd_step_reference` (arithmetic in float32).

    linf is one fused kernel. l2 needs a per-sample norm first: a reduction kernel writes per-block
    partial sums of g^2, d^2 and d*g (pixel units), from which the step scale and the projection
    factor follow in closed form, then one fused update kernel as for linf.
    """
    _check_step(delta, grad, clean, std, lower, upper, norm, real, sample_ndim)
    triton = _bind_triton()
    delta_c, grad_c, clean_c = delta.contiguous(), grad.contiguous(), clean.contiguous()
    (std_t, lower_t, upper_t, real_t), periods = _operands(delta, std, lower, upper, real)
    new_delta = torch.empty_like(delta_c)
    adv = torch.empty_like(delta_c)
    n_elements = delta.numel()
    if n_elements == 0:
        return new_delta, adv
    grid = (triton.cdiv(n_elements, _BLOCK),)
    if norm == "linf":
        jit(_pgd_linf_kernel)[grid](
            delta_c, grad_c, clean_c, std_t, lower_t, upper_t, real_t, new_delta, adv,
            n_elements, *periods, float(epsilon), float(step_size), BLOCK=_BLOCK,
        )  # fmt: skip
        return new_delta, adv

    std_inner, std_period, _, _, real_inner, real_period = periods
    sample_numel = _sample_numel(delta.shape, sample_ndim)
    n_samples = n_elements // sample_numel
    n_blocks = triton.cdiv(sample_numel, _BLOCK)
    partial = torch.empty(3, n_samples, n_blocks, device=delta.device, dtype=torch.float32)
    jit(_pgd_l2_sums_kernel)[(n_samples, n_blocks)](
        delta_c, grad_c, std_t, real_t, partial, sample_numel, std_inner, std_period, real_inner, real_period,
        n_samples, n_blocks, BLOCK=_BLOCK,
    )  # fmt: skip
    grad_sq, delta_sq, cross = partial.sum(dim=2)
    grad_scale = step_size / (grad_sq.sqrt() + _TINY)
    # ||d + a g||^2 expanded, so the projection needs no second pass over the image.
    radius = (delta_sq + 2 * grad_scale * cross + grad_scale.square() * grad_sq).clamp_min(0).sqrt()
    shrink = torch.where(radius > epsilon, epsilon / radius.clamp_min(_TINY), torch.ones_like(radius))
    jit(_pgd_l2_update_kernel)[grid](
        delta_c, grad_c, clean_c, std_t, lower_t, upper_t, real_t, grad_scale, shrink, new_delta, adv,
        n_elements, sample_numel, *periods, BLOCK=_BLOCK,
    )  # fmt: skip
    return new_delta, adv


def pgd_random_start_triton(
    clean: torch.Tensor,
    *,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    epsilon: float,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    real: torch.Tensor | None = None,
    sample_ndim: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`pgd_random_start_reference`, with the same distribution but its own
    random stream (``tl.rand``/``tl.randn`` seeded from torch's RNG or ``generator``)."""
    _check_norm(norm)
    _check_bounds("clean", clean, std, lower, upper, real, sample_ndim)
    triton = _bind_triton()
    clean_c = clean.contiguous()
    (std_t, lower_t, upper_t, real_t), periods = _operands(clean, std, lower, upper, real)
    out = torch.empty_like(clean_c)
    n_elements = clean.numel()
    seed = _seed(generator)
    if n_elements == 0:
        return out
    grid = (triton.cdiv(n_elements, _BLOCK),)
    if norm == "linf":
        jit(_random_linf_kernel)[grid](
            clean_c, std_t, lower_t, upper_t, real_t, out, n_elements, *periods, float(epsilon), seed,
            BLOCK=_BLOCK,
        )  # fmt: skip
        return out

    sample_numel = _sample_numel(clean.shape, sample_ndim)
    direction = torch.empty(
        n_elements // sample_numel, sample_numel, device=clean.device, dtype=torch.float32
    )
    _, _, _, _, real_inner, real_period = periods
    jit(_randn_kernel)[grid](real_t, direction, n_elements, real_inner, real_period, seed, BLOCK=_BLOCK)
    device = generator.device if generator is not None else "cpu"
    radius = epsilon * torch.rand(direction.shape[0], generator=generator, device=device).to(clean.device)
    scale = radius / torch.linalg.vector_norm(direction, dim=1).clamp_min(_TINY)
    jit(_random_l2_finish_kernel)[grid](
        direction, clean_c, std_t, lower_t, upper_t, real_t, scale, out, n_elements, sample_numel, *periods,
        BLOCK=_BLOCK,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Dispatching entry points
# --------------------------------------------------------------------------------------------------


def pgd_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    clean: torch.Tensor,
    *,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    epsilon: float,
    step_size: float,
    norm: str = "linf",
    real: torch.Tensor | None = None,
    sample_ndim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD step (see :func:`pgd_step_reference`), on the backend :func:`kernel_backend` picks."""
    step = pgd_step_triton if kernel_backend(delta) == "triton" else pgd_step_reference
    return step(
        delta, grad, clean, std=std, lower=lower, upper=upper, epsilon=epsilon, step_size=step_size, norm=norm,
        real=real, sample_ndim=sample_ndim,
    )  # fmt: skip


def pgd_random_start(
    clean: torch.Tensor,
    *,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    epsilon: float,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    real: torch.Tensor | None = None,
    sample_ndim: int | None = None,
) -> torch.Tensor:
    """A random initial delta (see :func:`pgd_random_start_reference`), on the picked backend."""
    start = pgd_random_start_triton if kernel_backend(clean) == "triton" else pgd_random_start_reference
    return start(
        clean, std=std, lower=lower, upper=upper, epsilon=epsilon, norm=norm, generator=generator, real=real,
        sample_ndim=sample_ndim,
    )  # fmt: skip
