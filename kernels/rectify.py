"""Rectification KL between clean and adversarial logits, without materialising [N, V] probabilities.

Three versions with one signature: a naive autograd reference, a row-blocked PyTorch version for
CPU, and a Triton online-softmax kernel; the last two share one torch.autograd.Function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import jit, kernel_backend, load_triton

# Bound to ``triton.language`` on the first Triton launch, so importing this module never needs triton.
tl = None

# Rows per block in the PyTorch version are chosen so a block holds about this many logits:
# a few float32 buffers of this size are all the working memory beyond the returned gradients.
_BLOCK_ELEMENTS = 1 << 20
_MAX_TRITON_BLOCK = 4096


def _check_logits(clean_logits, adv_logits, mask, temperature) -> None:
    if clean_logits.shape != adv_logits.shape:
        raise ValueError(
            f"clean_logits and adv_logits must have one shape; got {tuple(clean_logits.shape)} "
            f"and {tuple(adv_logits.shape)}"
        )
    if adv_logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension (shape [..., V])")
    if mask is not None and mask.shape != adv_logits.shape[:-1]:
        raise ValueError(
            f"mask must have the logits' leading shape {tuple(adv_logits.shape[:-1])}; got {tuple(mask.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


# --------------------------------------------------------------------------------------------------
# Reference: naive PyTorch, autograd does the backward
# --------------------------------------------------------------------------------------------------


def rectification_kl_reference(
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    detach_clean: bool = False,
) -> torch.Tensor:
    """Mean over counted rows of ``KL(softmax(clean / T) || softmax(adv / T))``, as float32
    (float64 for float64 logits, so that gradcheck can use it).

    Logits are ``[..., V]``; ``mask`` (leading shape, True = the row counts) selects rows. With no
    counted row the result is a zero that still backpropagates (zero gradients).
    """
    _check_logits(clean_logits, adv_logits, mask, temperature)
    vocab = adv_logits.shape[-1]
    clean = clean_logits.detach() if detach_clean else clean_logits
    dtype = torch.promote_types(adv_logits.dtype, torch.float32)
    log_p_clean = F.log_softmax(clean.reshape(-1, vocab).to(dtype) / temperature, dim=-1)
    log_p_adv = F.log_softmax(adv_logits.reshape(-1, vocab).to(dtype) / temperature, dim=-1)
    per_row = F.kl_div(log_p_adv, log_p_clean, reduction="none", log_target=True).sum(dim=-1)
    counted = (
        torch.ones_like(per_row, dtype=torch.bool)
        if mask is None
        else mask.reshape(-1).to(per_row.device, torch.bool)
    )
    count = int(counted.sum())
    if count == 0:
        zero = adv_logits.sum() * 0
        if not detach_clean:
            zero = zero + clean_logits.sum() * 0
        return zero.to(dtype)
    return torch.where(counted, per_row, 0).sum() / count


# --------------------------------------------------------------------------------------------------
# Forward-with-gradients computations (loss and both gradients in one sweep over the logits)
# --------------------------------------------------------------------------------------------------


def _kl_and_grads_torch(clean, adv, mask, temperature, want_clean_grad, want_adv_grad):
    """Row blocks of plain PyTorch. The working memory is four [rows_per_block, V] buffers, allocated
    once and reused through ``out=`` (fresh buffers per block cost page faults on CPU)."""
    n_rows, vocab = adv.shape
    counted = None if mask is None else mask.to(adv.device, torch.bool)
    count = n_rows if counted is None else int(counted.sum())
    dtype = torch.promote_types(adv.dtype, torch.float32)
    scale = 1.0 / (temperature * max(count, 1))
    per_row = torch.zeros(n_rows, device=adv.device, dtype=dtype)
    grad_clean = torch.empty_like(clean) if want_clean_grad else None
    grad_adv = torch.empty_like(adv) if want_adv_grad else None
    rows_per_block = max(1, min(n_rows, _BLOCK_ELEMENTS // max(vocab, 1)))
    workspace = torch.empty(4, rows_per_block, vocab, device=adv.device, dtype=dtype)

    for start in range(0, n_rows, rows_per_block):
        rows = slice(start, start + rows_per_block)
        n_block = min(rows_per_block, n_rows - start)
        log_p_clean, log_p_adv, p_clean, scratch = (buffer[:n_block] for buffer in workspace)
        weight = None
        if counted is not None:
            block_counted = counted[rows]
            if not bool(block_counted.any()):
                for grad in (grad_clean, grad_adv):
                    if grad is not None:
                        grad[rows] = 0
                continue
            weight = block_counted.to(dtype).unsqueeze(1)
        torch.mul(clean[rows], 1.0 / temperature, out=log_p_clean)
        log_p_clean -= torch.logsumexp(log_p_clean, dim=-1, keepdim=True)
        torch.mul(adv[rows], 1.0 / temperature, out=log_p_adv)
        log_p_adv -= torch.logsumexp(log_p_adv, dim=-1, keepdim=True)
        torch.exp(log_p_clean, out=p_clean)
        if grad_adv is not None:
            block_grad = torch.exp(log_p_adv, out=scratch).sub_(p_clean).mul_(scale)
            if weight is not None:
                block_grad.mul_(weight)
            grad_adv[rows] = block_grad
        log_ratio = torch.sub(log_p_clean, log_p_adv, out=log_p_adv)  # log p_c - log p_a
        kl = torch.linalg.vecdot(p_clean, log_ratio, dim=-1)
        if weight is not None:
            kl = torch.where(block_counted, kl, 0)
        per_row[rows] = kl
        if grad_clean is not None:
            block_grad = log_ratio.sub_(kl.unsqueeze(1)).mul_(p_clean).mul_(scale)
            if weight is not None:
                block_grad.mul_(weight)
            grad_clean[rows] = block_grad
    loss = per_row.sum() * (1.0 / max(count, 1))
    return loss, grad_clean, grad_adv


def _kl_rows_kernel(
    clean_ptr,
    adv_ptr,
    mask_ptr,
    scale_ptr,
    loss_ptr,
    grad_clean_ptr,
    grad_adv_ptr,
    n_cols,
    clean_row_stride,
    adv_row_stride,
    inv_temperature,
    HAS_MASK: tl.constexpr,
    GRAD_CLEAN: tl.constexpr,
    GRAD_ADV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row. Pass 1: online max / sum of exp for both softmaxes and the running
    # sum of e^{x_c - m_c} (x_c - x_a), which gives the row's KL. Pass 2 (only if gradients are
    # wanted): the exact gradients, written once in the logits' dtype.
    row = tl.program_id(0).to(tl.int64)
    clean_row = clean_ptr + row * clean_row_stride
    adv_row = adv_ptr + row * adv_row_stride
    counted = True
    if HAS_MASK:
        counted = tl.load(mask_ptr + row) != 0
    if counted:
        max_clean = float("-inf")
        max_adv = float("-inf")
        sum_clean = 0.0
        sum_adv = 0.0
        weighted_gap = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x_clean = tl.load(clean_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_temperature
            x_adv = tl.load(adv_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_temperature
            # Lanes past the row end take -inf for the max and the sums (exp gives 0 there).
            masked_clean = tl.where(inside, x_clean, float("-inf"))
            masked_adv = tl.where(inside, x_adv, float("-inf"))
            new_max_clean = tl.maximum(max_clean, tl.max(masked_clean, axis=0))
            new_max_adv = tl.maximum(max_adv, tl.max(masked_adv, axis=0))
            rescale_clean = tl.exp(max_clean - new_max_clean)
            e_clean = tl.exp(masked_clean - new_max_clean)
            sum_clean = sum_clean * rescale_clean + tl.sum(e_clean, axis=0)
            weighted_gap = weighted_gap * rescale_clean + tl.sum(e_clean * (x_clean - x_adv), axis=0)
            sum_adv = sum_adv * tl.exp(max_adv - new_max_adv) + tl.sum(
                tl.exp(masked_adv - new_max_adv), axis=0
            )
            max_clean = new_max_clean
            max_adv = new_max_adv
        lse_clean = max_clean + tl.log(sum_clean)
        lse_adv = max_adv + tl.log(sum_adv)
        kl = weighted_gap / sum_clean - lse_clean + lse_adv
        tl.store(loss_ptr + row, kl)
        if GRAD_CLEAN or GRAD_ADV:
            scale = tl.load(scale_ptr)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < n_cols
                x_clean = tl.load(clean_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_temperature
                x_adv = tl.load(adv_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_temperature
                log_p_clean = x_clean - lse_clean
                log_p_adv = x_adv - lse_adv
                p_clean = tl.exp(log_p_clean)
                if GRAD_ADV:
                    grad = (tl.exp(log_p_adv) - p_clean) * scale
                    tl.store(
                        grad_adv_ptr + row * n_cols + cols,
                        grad.to(grad_adv_ptr.dtype.element_ty),
                        mask=inside,
                    )
                if GRAD_CLEAN:
                    grad = p_clean * ((log_p_clean - log_p_adv) - kl) * scale
                    tl.store(
                        grad_clean_ptr + row * n_cols + cols,
                        grad.to(grad_clean_ptr.dtype.element_ty),
                        mask=inside,
                    )
    else:
        tl.store(loss_ptr + row, 0.0)
        if GRAD_CLEAN or GRAD_ADV:
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < n_cols
                zero = tl.zeros([BLOCK], dtype=tl.float32)
                if GRAD_ADV:
                    tl.store(
                        grad_adv_ptr + row * n_cols + cols,
                        zero.to(grad_adv_ptr.dtype.element_ty),
                        mask=inside,
                    )
                if GRAD_CLEAN:
                    tl.store(
                        grad_clean_ptr + row * n_cols + cols,
                        zero.to(grad_clean_ptr.dtype.element_ty),
                        mask=inside,
                    )


def _kl_and_grads_triton(clean, adv, mask, temperature, want_clean_grad, want_adv_grad):
    """One Triton program per row; gradients are computed in the forward pass and stashed."""
    global tl
    triton, tl = load_triton()
    n_rows, vocab = adv.shape
    if clean.stride(-1) != 1:
        clean = clean.contiguous()
    if adv.stride(-1) != 1:
        adv = adv.contiguous()
    device = adv.device
    per_row = torch.empty(n_rows, device=device, dtype=torch.float32)
    if mask is None:
        count = torch.tensor(float(n_rows), device=device)
        mask_arg = per_row  # unused: HAS_MASK is False
    else:
        mask_arg = mask.to(device=device, dtype=torch.int8).contiguous()
        count = mask_arg.sum(dtype=torch.float32)
    # Kept on the device: no host synchronisation to learn how many rows count.
    scale = (1.0 / (temperature * count.clamp_min(1.0))).reshape(1)
    grad_clean = torch.empty(n_rows, vocab, device=device, dtype=clean.dtype) if want_clean_grad else None
    grad_adv = torch.empty(n_rows, vocab, device=device, dtype=adv.dtype) if want_adv_grad else None
    if n_rows:
        block = min(_MAX_TRITON_BLOCK, triton.next_power_of_2(vocab))
        jit(_kl_rows_kernel)[(n_rows,)](
            clean, adv, mask_arg, scale, per_row,
            grad_clean if grad_clean is not None else per_row,
            grad_adv if grad_adv is not None else per_row,
            vocab, clean.stride(0), adv.stride(0), 1.0 / temperature,
            HAS_MASK=mask is not None, GRAD_CLEAN=want_clean_grad, GRAD_ADV=want_adv_grad,
            BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
    loss = per_row.sum() / count.clamp_min(1.0)
    return loss, grad_clean, grad_adv


class RectificationKLFunction(torch.autograd.Function):
    """Loss and both gradients computed in one forward sweep; backward only scales the stash.

    Stashing costs exactly the gradients that would be returned anyway; recomputing in backward
    would read the logits and redo the exponentials a second time for no memory gain.
    """

    @staticmethod
    def forward(ctx, clean, adv, mask, temperature, want_clean_grad, want_adv_grad, compute):
        loss, grad_clean, grad_adv = compute(clean, adv, mask, temperature, want_clean_grad, want_adv_grad)
        # Saved tensors are released as soon as backward has run (unless retain_graph), so the
        # gradients returned are these very buffers: autograd need not copy them into ``.grad``.
        ctx.save_for_backward(grad_clean, grad_adv)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for stashed in ctx.saved_tensors:
            if stashed is None:
                grads.append(None)
            elif torch.equal(grad_output, torch.ones_like(grad_output)):
                grads.append(stashed)
            else:
                grads.append(stashed * grad_output.to(stashed.dtype))
        return grads[0], grads[1], None, None, None, None, None


def _rectification_kl_fused(compute, clean_logits, adv_logits, mask, temperature, detach_clean):
    _check_logits(clean_logits, adv_logits, mask, temperature)
    vocab = adv_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    want_adv_grad = grad_on and adv_logits.requires_grad
    want_clean_grad = grad_on and clean_logits.requires_grad and not detach_clean
    clean = clean_logits.detach() if detach_clean else clean_logits
    flat_mask = None if mask is None else mask.reshape(-1)
    loss = RectificationKLFunction.apply(
        clean.reshape(-1, vocab),
        adv_logits.reshape(-1, vocab),
        flat_mask,
        float(temperature),
        want_clean_grad,
        want_adv_grad,
        compute,
    )
    return loss


def rectification_kl_chunked(
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    detach_clean: bool = False,
) -> torch.Tensor:
    """:func:`rectification_kl_reference` in plain PyTorch, over blocks of rows, with the gradients
    computed blockwise in the forward pass: bounded working memory on any device."""
    return _rectification_kl_fused(
        _kl_and_grads_torch, clean_logits, adv_logits, mask, temperature, detach_clean
    )


def rectification_kl_triton(
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    detach_clean: bool = False,
) -> torch.Tensor:
    """:func:`rectification_kl_reference` as a Triton kernel: online softmax over vocabulary blocks,
    one program per row, loss and gradients in one launch."""
    return _rectification_kl_fused(
        _kl_and_grads_triton, clean_logits, adv_logits, mask, temperature, detach_clean
    )


def rectification_kl(
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    detach_clean: bool = False,
) -> torch.Tensor:
    """Rectification KL (see :func:`rectification_kl_reference`) on the backend :func:`kernel_backend`
    picks: the Triton kernel on CUDA, the row-blocked PyTorch version elsewhere."""
    kl = rectification_kl_triton if kernel_backend(adv_logits) == "triton" else rectification_kl_chunked
    return kl(clean_logits, adv_logits, mask, temperature=temperature, detach_clean=detach_clean)
