"""Projected-gradient-descent update and random start for adversarial images, fused in Triton.

Each Triton kernel sits beside a plain-PyTorch reference with the same signature.
"""

from __future__ import annotations

import torch

from .dispatch import jit, kernel_backend, load_triton

# Bound to ``triton.language`` on the first Triton launch, so importing this module never needs triton.
tl = None

NORMS = ("linf", "l2")
_BLOCK = 1024
_TINY = 1e-12


# --------------------------------------------------------------------------------------------------
# Shared checks and per-channel helpers
# --------------------------------------------------------------------------------------------------


def _check_image(name: str, tensor: torch.Tensor, std: torch.Tensor) -> None:
    if tensor.dim() < 3:
        raise ValueError(f"{name} must have shape (..., C, H, W); got shape {tuple(tensor.shape)}")
    if std.dim() != 1 or std.numel() != tensor.shape[-3]:
        raise ValueError(
            f"std must be a 1-D tensor with one entry per channel ({tensor.shape[-3]}); "
            f"got shape {tuple(std.shape)}"
        )


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; allowed values are {', '.join(NORMS)}")


def _check_step(delta, grad, clean, std, lower, upper, norm) -> None:
    _check_norm(norm)
    _check_image("delta", delta, std)
    for name, other in (("grad", grad), ("clean", clean)):
        if other.shape != delta.shape:
            raise ValueError(f"{name} must have delta's shape {tuple(delta.shape)}; got {tuple(other.shape)}")
    for name, vec in (("lower", lower), ("upper", upper)):
        if vec.shape != std.shape:
            raise ValueError(f"{name} must have std's shape {tuple(std.shape)}; got {tuple(vec.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision images are updated in float32 and rounded once at the end.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(vec: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return vec.to(device=like.device, dtype=dtype).view(-1, 1, 1)


def _sample_view(tensor: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> (S, C, H, W), where a sample is one (C, H, W) image."""
    return tensor.reshape(-1, *tensor.shape[-3:])


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD ascent step in normalised pixel units; returns ``(new_delta, adversarial_input)``.

    ``epsilon`` and ``step_size`` are in [0, 1] pixel units; channel c's budget in normalised units
    is ``epsilon / std[c]``. linf: sign step, clamp to the per-channel box; l2: normalised step and
    projection onto the per-sample L2 ball, both in pixel units. Then ``clean + delta`` is clamped
    to ``[lower, upper]``.
    """
    _check_step(delta, grad, clean, std, lower, upper, norm)
    dtype = _compute_dtype(delta.dtype)
    std_c = _per_channel(std, delta, dtype)
    lower_c = _per_channel(lower, delta, dtype)
    upper_c = _per_channel(upper, delta, dtype)

    if norm == "linf":
        budget = epsilon / std_c
        # One fresh buffer holds the step, then the new delta; every later op is in place.
        new = torch.sign(grad).to(dtype)
        new.mul_(step_size / std_c).add_(delta)
        new.clamp_(min=-budget, max=budget)
    else:
        grad_pix = _sample_view(grad).to(dtype) / std_c
        grad_norm = torch.linalg.vector_norm(grad_pix.flatten(1), dim=1).view(-1, 1, 1, 1)
        new = _sample_view(delta).to(dtype) * std_c
        new.add_(grad_pix.mul_(step_size / (grad_norm + _TINY)))
        radius = torch.linalg.vector_norm(new.flatten(1), dim=1).view(-1, 1, 1, 1)
        shrink = torch.where(radius > epsilon, epsilon / radius.clamp_min(_TINY), torch.ones_like(radius))
        new.mul_(shrink).div_(std_c)
        new = new.view(delta.shape)

    adv = torch.add(clean, new)
    adv.clamp_(min=lower_c, max=upper_c)
    torch.sub(adv, clean, out=new)
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
) -> torch.Tensor:
    """A random initial perturbation inside the budget, with ``clean + delta`` inside the box.

    linf: uniform in ``[-epsilon, epsilon]`` pixel units per element; l2: a uniformly random
    direction per sample with radius ``epsilon * U(0, 1)`` pixel units.
    """
    _check_norm(norm)
    _check_image("clean", clean, std)
    dtype = _compute_dtype(clean.dtype)
    std_c = _per_channel(std, clean, dtype)
    device = generator.device if generator is not None else clean.device
    samples = _sample_view(clean)
    if norm == "linf":
        pix = torch.rand(clean.shape, generator=generator, device=device, dtype=dtype).to(clean.device)
        pix.mul_(2 * epsilon).sub_(epsilon)
    else:
        pix = torch.randn(samples.shape, generator=generator, device=device, dtype=dtype).to(clean.device)
        radius = epsilon * torch.rand(samples.shape[0], generator=generator, device=device, dtype=dtype)
        length = torch.linalg.vector_norm(pix.flatten(1), dim=1).clamp_min(_TINY)
        pix.mul_((radius.to(clean.device) / length).view(-1, 1, 1, 1))
        pix = pix.view(clean.shape)
    delta = pix.div_(std_c)
    adv = torch.add(clean, delta).clamp_(
        min=_per_channel(lower, clean, dtype), max=_per_channel(upper, clean, dtype)
    )
    return torch.sub(adv, clean, out=delta).to(clean.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels (plain functions, compiled by ``dispatch.jit`` on first launch)
# --------------------------------------------------------------------------------------------------


def _pgd_linf_kernel(
    delta_ptr,
    grad_ptr,
    clean_ptr,
    std_ptr,
    lower_ptr,
    upper_ptr,
    new_delta_ptr,
    adv_ptr,
    n_elements,
    plane,
    channels,
    epsilon,
    step_size,
    BLOCK: tl.constexpr,
):
    # Reads grad, delta and clean once, writes new delta and adv once.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    channel = (offs // plane) % channels
    std = tl.load(std_ptr + channel, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + channel, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + channel, mask=inside, other=0.0)
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)

    sign = tl.where(grad > 0, 1.0, 0.0) - tl.where(grad < 0, 1.0, 0.0)
    budget = epsilon / std
    delta = delta + (step_size / std) * sign
    delta = tl.minimum(tl.maximum(delta, -budget), budget)
    adv = tl.minimum(tl.maximum(clean + delta, lower), upper)
    tl.store(new_delta_ptr + offs, (adv - clean).to(new_delta_ptr.dtype.element_ty), mask=inside)
    tl.store(adv_ptr + offs, adv.to(adv_ptr.dtype.element_ty), mask=inside)


def _pgd_l2_sums_kernel(
    delta_ptr,
    grad_ptr,
    std_ptr,
    partial_ptr,
    sample_numel,
    plane,
    channels,
    n_samples,
    n_blocks,
    BLOCK: tl.constexpr,
):
    # Per (sample, block): sum g_pix^2, sum d_pix^2, sum d_pix * g_pix, in pixel units.
    sample = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    local = block * BLOCK + tl.arange(0, BLOCK)
    inside = local < sample_numel
    offs = sample * sample_numel + local
    std = tl.load(std_ptr + (local // plane) % channels, mask=inside, other=1.0)
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32) / std
    delta = tl.load(delta_ptr + offs, mask=inside, other=0.0).to(tl.float32) * std
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
    grad_scale_ptr,
    shrink_ptr,
    new_delta_ptr,
    adv_ptr,
    n_elements,
    sample_numel,
    plane,
    channels,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    sample = offs // sample_numel
    channel = (offs // plane) % channels
    std = tl.load(std_ptr + channel, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + channel, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + channel, mask=inside, other=0.0)
    grad_scale = tl.load(grad_scale_ptr + sample, mask=inside, other=0.0)
    shrink = tl.load(shrink_ptr + sample, mask=inside, other=0.0)
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)

    delta_pix = (delta * std + grad_scale * (grad / std)) * shrink
    adv = tl.minimum(tl.maximum(clean + delta_pix / std, lower), upper)
    tl.store(new_delta_ptr + offs, (adv - clean).to(new_delta_ptr.dtype.element_ty), mask=inside)
    tl.store(adv_ptr + offs, adv.to(adv_ptr.dtype.element_ty), mask=inside)


def _random_linf_kernel(
    clean_ptr,
    std_ptr,
    lower_ptr,
    upper_ptr,
    out_ptr,
    n_elements,
    plane,
    channels,
    epsilon,
    seed,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    channel = (offs // plane) % channels
    std = tl.load(std_ptr + channel, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + channel, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + channel, mask=inside, other=0.0)
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    delta = (tl.rand(seed, offs) * 2.0 - 1.0) * (epsilon / std)
    adv = tl.minimum(tl.maximum(clean + delta, lower), upper)
    tl.store(out_ptr + offs, (adv - clean).to(out_ptr.dtype.element_ty), mask=inside)


def _randn_kernel(out_ptr, n_elements, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.randn(seed, offs), mask=offs < n_elements)


def _random_l2_finish_kernel(
    direction_ptr,
    clean_ptr,
    std_ptr,
    lower_ptr,
    upper_ptr,
    scale_ptr,
    out_ptr,
    n_elements,
    sample_numel,
    plane,
    channels,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    channel = (offs // plane) % channels
    std = tl.load(std_ptr + channel, mask=inside, other=1.0)
    lower = tl.load(lower_ptr + channel, mask=inside, other=0.0)
    upper = tl.load(upper_ptr + channel, mask=inside, other=0.0)
    scale = tl.load(scale_ptr + offs // sample_numel, mask=inside, other=0.0)
    direction = tl.load(direction_ptr + offs, mask=inside, other=0.0)
    clean = tl.load(clean_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    adv = tl.minimum(tl.maximum(clean + direction * scale / std, lower), upper)
    tl.store(out_ptr + offs, (adv - clean).to(out_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------


def _bind_triton():
    global tl
    triton, tl = load_triton()
    return triton


def _channel_vectors(like: torch.Tensor, *vectors: torch.Tensor) -> list[torch.Tensor]:
    return [v.to(device=like.device, dtype=torch.float32).contiguous() for v in vectors]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`pgd_step_reference` (arithmetic in float32).

    linf is one fused kernel. l2 needs a per-sample norm first: a reduction kernel writes per-block
    partial sums of g^2, d^2 and d*g (pixel units), from which the step scale and the projection
    factor follow in closed form, then one fused update kernel as for linf.
    """
    _check_step(delta, grad, clean, std, lower, upper, norm)
    triton = _bind_triton()
    delta_c, grad_c, clean_c = delta.contiguous(), grad.contiguous(), clean.contiguous()
    std_f, lower_f, upper_f = _channel_vectors(delta, std, lower, upper)
    new_delta = torch.empty_like(delta_c)
    adv = torch.empty_like(delta_c)
    n_elements = delta.numel()
    channels, plane = delta.shape[-3], delta.shape[-2] * delta.shape[-1]
    if n_elements == 0:
        return new_delta, adv
    grid = (triton.cdiv(n_elements, _BLOCK),)
    if norm == "linf":
        jit(_pgd_linf_kernel)[grid](
            delta_c, grad_c, clean_c, std_f, lower_f, upper_f, new_delta, adv,
            n_elements, plane, channels, float(epsilon), float(step_size), BLOCK=_BLOCK,
        )  # fmt: skip
        return new_delta, adv

    sample_numel = channels * plane
    n_samples = n_elements // sample_numel
    n_blocks = triton.cdiv(sample_numel, _BLOCK)
    partial = torch.empty(3, n_samples, n_blocks, device=delta.device, dtype=torch.float32)
    jit(_pgd_l2_sums_kernel)[(n_samples, n_blocks)](
        delta_c, grad_c, std_f, partial, sample_numel, plane, channels, n_samples, n_blocks, BLOCK=_BLOCK
    )
    grad_sq, delta_sq, cross = partial.sum(dim=2)
    grad_scale = step_size / (grad_sq.sqrt() + _TINY)
    # ||d + a g||^2 expanded, so the projection needs no second pass over the image.
    radius = (delta_sq + 2 * grad_scale * cross + grad_scale.square() * grad_sq).clamp_min(0).sqrt()
    shrink = torch.where(radius > epsilon, epsilon / radius.clamp_min(_TINY), torch.ones_like(radius))
    jit(_pgd_l2_update_kernel)[grid](
        delta_c, grad_c, clean_c, std_f, lower_f, upper_f, grad_scale, shrink, new_delta, adv,
        n_elements, sample_numel, plane, channels, BLOCK=_BLOCK,
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
) -> torch.Tensor:
    """Triton version of :func:`pgd_random_start_reference`, with the same distribution but its own
    random stream (``tl.rand``/``tl.randn`` seeded from torch's RNG or ``generator``)."""
    _check_norm(norm)
    _check_image("clean", clean, std)
    triton = _bind_triton()
    clean_c = clean.contiguous()
    std_f, lower_f, upper_f = _channel_vectors(clean, std, lower, upper)
    out = torch.empty_like(clean_c)
    n_elements = clean.numel()
    channels, plane = clean.shape[-3], clean.shape[-2] * clean.shape[-1]
    seed = _seed(generator)
    if n_elements == 0:
        return out
    grid = (triton.cdiv(n_elements, _BLOCK),)
    if norm == "linf":
        jit(_random_linf_kernel)[grid](
            clean_c, std_f, lower_f, upper_f, out, n_elements, plane, channels, float(epsilon), seed,
            BLOCK=_BLOCK,
        )  # fmt: skip
        return out

    sample_numel = channels * plane
    direction = torch.empty(
        n_elements // sample_numel, sample_numel, device=clean.device, dtype=torch.float32
    )
    jit(_randn_kernel)[grid](direction, n_elements, seed, BLOCK=_BLOCK)
    device = generator.device if generator is not None else "cpu"
    radius = epsilon * torch.rand(direction.shape[0], generator=generator, device=device).to(clean.device)
    scale = radius / torch.linalg.vector_norm(direction, dim=1).clamp_min(_TINY)
    jit(_random_l2_finish_kernel)[grid](
        direction, clean_c, std_f, lower_f, upper_f, scale, out, n_elements, sample_numel, plane, channels,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD step (see :func:`pgd_step_reference`), on the backend :func:`kernel_backend` picks."""
    step = pgd_step_triton if kernel_backend(delta) == "triton" else pgd_step_reference
    return step(
        delta, grad, clean, std=std, lower=lower, upper=upper, epsilon=epsilon, step_size=step_size, norm=norm
    )


def pgd_random_start(
    clean: torch.Tensor,
    *,
    std: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    epsilon: float,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random initial delta (see :func:`pgd_random_start_reference`), on the picked backend."""
    start = pgd_random_start_triton if kernel_backend(clean) == "triton" else pgd_random_start_reference
    return start(clean, std=std, lower=lower, upper=upper, epsilon=epsilon, norm=norm, generator=generator)
