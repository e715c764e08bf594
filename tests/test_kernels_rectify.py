"""Tests for the rectification KL: reference gradients by gradcheck, the row-blocked PyTorch and the
Triton (interpreted on CPU) versions against the reference, masks, temperature and detach_clean."""

import pytest
import torch
from kernel_support import needs_triton, only_when_triton_runs_elsewhere, run_triton_tests_in_fresh_process

from ran_peft.kernels import rectify as rectify_module
from ran_peft.kernels.rectify import (
    rectification_kl,
    rectification_kl_chunked,
    rectification_kl_reference,
    rectification_kl_triton,
)

# (shape, dtype) -> (rtol, atol) on the loss and the gradients: float32 is rounding only; half types
# store the gradients in their own precision (one unit in the last place).
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-5),
    torch.float16: (2e-3, 1e-6),
}


def _logits(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randn(shape, generator=gen) * 3
    adv = clean + torch.randn(shape, generator=gen)
    return clean.to(dtype), adv.to(dtype)


def _mask(kind, leading, seed=0):
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(leading, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(leading, generator=gen) > 0.4
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    return mask


def _run(fn, clean, adv, mask, **kwargs):
    clean = clean.clone().requires_grad_()
    adv = adv.clone().requires_grad_()
    loss = fn(clean, adv, mask, **kwargs)
    loss.backward()
    return loss, clean.grad, adv.grad


def _assert_matches_reference(fn, shape, dtype, mask_kind, temperature=1.0, detach_clean=False):
    clean, adv = _logits(shape, dtype)
    mask = _mask(mask_kind, shape[:-1])
    kwargs = dict(temperature=temperature, detach_clean=detach_clean)
    want_loss, want_clean, want_adv = _run(rectification_kl_reference, clean, adv, mask, **kwargs)
    loss, grad_clean, grad_adv = _run(fn, clean, adv, mask, **kwargs)
    rtol, atol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grad_adv.dtype == dtype
    torch.testing.assert_close(grad_adv, want_adv, rtol=rtol, atol=atol)
    if detach_clean:
        assert grad_clean is None and want_clean is None
    else:
        torch.testing.assert_close(grad_clean, want_clean, rtol=rtol, atol=atol)


CASES = [((2, 3, 1000), "partial"), ((5, 4099), "none"), ((4, 7), "all_masked"), ((3, 2, 129), "partial")]


# ---------------------------------------------------------------------------- reference


def test_kernel_kl_reference_gradcheck():
    clean, adv = _logits((2, 3, 11), torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    inputs = (clean.requires_grad_(), adv.requires_grad_())

    def loss(c, a):
        return rectification_kl_reference(c, a, mask, temperature=1.5)

    assert torch.autograd.gradcheck(loss, inputs)
    assert rectification_kl_reference(clean.float(), adv.float()).dtype == torch.float32


def test_kernel_kl_reference_matches_analytic_gradients():
    clean, adv = _logits((6, 50), torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    temperature = 2.0
    _, grad_clean, grad_adv = _run(rectification_kl_reference, clean, adv, mask, temperature=temperature)
    p_clean, p_adv = (clean / temperature).softmax(-1), (adv / temperature).softmax(-1)
    log_ratio = p_clean.log() - p_adv.log()
    kl = (p_clean * log_ratio).sum(-1, keepdim=True)
    weight = mask.double().unsqueeze(1) / (temperature * mask.sum())
    torch.testing.assert_close(grad_adv, (p_adv - p_clean) * weight)
    torch.testing.assert_close(grad_clean, p_clean * (log_ratio - kl) * weight)


def test_kernel_kl_chunked_gradcheck():
    clean, adv = _logits((3, 2, 9), torch.float64)
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    inputs = (clean.requires_grad_(), adv.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda c, a: rectification_kl_chunked(c, a, mask, temperature=0.7), inputs
    )


def test_kernel_kl_is_zero_for_equal_logits_and_positive_otherwise():
    clean, adv = _logits((4, 33), torch.float32)
    assert rectification_kl_chunked(clean, clean).abs() < 1e-6
    assert rectification_kl_chunked(clean, adv) > 0


# ---------------------------------------------------------------------------- row-blocked PyTorch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,mask_kind", CASES)
def test_kernel_kl_chunked_matches_reference(shape, mask_kind, dtype):
    _assert_matches_reference(rectification_kl_chunked, shape, dtype, mask_kind)


@pytest.mark.parametrize("temperature,detach_clean", [(2.0, False), (0.5, True)])
def test_kernel_kl_chunked_temperature_and_detach(temperature, detach_clean):
    _assert_matches_reference(
        rectification_kl_chunked, (3, 4, 257), torch.float32, "partial", temperature, detach_clean
    )


def test_kernel_kl_chunked_small_blocks_match_reference(monkeypatch):
    # Blocks of 2 rows: masked-out blocks, a ragged last block.
    monkeypatch.setattr(rectify_module, "_BLOCK_ELEMENTS", 2 * 300)
    _assert_matches_reference(rectification_kl_chunked, (7, 300), torch.float32, "partial")


def test_kernel_kl_all_masked_is_zero_and_backpropagates():
    clean, adv = _logits((2, 5, 40), torch.float32)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for fn in (rectification_kl_reference, rectification_kl_chunked):
        loss, grad_clean, grad_adv = _run(fn, clean, adv, mask)
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        assert torch.count_nonzero(grad_clean) == 0 and torch.count_nonzero(grad_adv) == 0


def test_kernel_kl_chunked_takes_zero_rows():
    # RAN gives the KL only the counted rows of a generative model's logits: a batch may have none.
    clean, adv = _logits((0, 40), torch.float32)
    loss, grad_clean, grad_adv = _run(rectification_kl_chunked, clean, adv, None)
    assert loss.item() == 0.0
    assert grad_clean.shape == (0, 40) and grad_adv.shape == (0, 40)


def test_kernel_kl_chunked_scales_with_upstream_gradient():
    clean, adv = _logits((3, 64), torch.float32)
    adv_once = adv.clone().requires_grad_()
    rectification_kl_chunked(clean, adv_once).backward()
    adv_scaled = adv.clone().requires_grad_()
    (3.0 * rectification_kl_chunked(clean, adv_scaled) + adv_scaled.sum() * 0).backward()
    torch.testing.assert_close(adv_scaled.grad, 3.0 * adv_once.grad)


def test_kernel_kl_chunked_without_grad_needs_no_backward():
    clean, adv = _logits((3, 64), torch.float32)
    with torch.no_grad():
        loss = rectification_kl_chunked(clean.requires_grad_(), adv.requires_grad_())
    assert not loss.requires_grad
    torch.testing.assert_close(loss, rectification_kl_reference(clean, adv).detach())


def test_kernel_kl_dispatcher_uses_chunked_on_cpu(monkeypatch):
    monkeypatch.delenv("RAN_PEFT_KERNELS", raising=False)
    clean, adv = _logits((2, 3, 50), torch.float32)
    got = _run(rectification_kl, clean, adv, None)
    want = _run(rectification_kl_chunked, clean, adv, None)
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=0, atol=0)


def test_kernel_kl_rejects_bad_arguments():
    clean, adv = _logits((2, 10), torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        rectification_kl(clean, adv[:, :5])
    with pytest.raises(ValueError, match="mask"):
        rectification_kl(clean, adv, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        rectification_kl(clean, adv, temperature=0.0)


# ---------------------------------------------------------------------------- Triton (interpreted)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,mask_kind", CASES)
def test_kernel_kl_triton_matches_reference(shape, mask_kind, dtype):
    _assert_matches_reference(rectification_kl_triton, shape, dtype, mask_kind)


@needs_triton
@pytest.mark.parametrize("mask_kind", ["none", "partial"])
def test_kernel_kl_triton_vocab_over_several_blocks(mask_kind, monkeypatch):
    # 3 rows x 4099: the online softmax crosses 5 blocks of 1024 with a ragged last one.
    monkeypatch.setattr(rectify_module, "_MAX_TRITON_BLOCK", 1024)
    _assert_matches_reference(rectification_kl_triton, (3, 4099), torch.float32, mask_kind)


@needs_triton
@pytest.mark.parametrize("temperature,detach_clean", [(2.0, False), (0.5, True)])
def test_kernel_kl_triton_temperature_and_detach(temperature, detach_clean):
    _assert_matches_reference(
        rectification_kl_triton, (3, 4, 257), torch.float32, "partial", temperature, detach_clean
    )


@needs_triton
def test_kernel_kl_triton_large_logit_gap_is_stable():
    clean, adv = _logits((2, 1000), torch.float32)
    clean = clean + 80.0  # exp would overflow without the running max
    adv = adv * 20.0
    _assert_matches_reference(rectification_kl_triton, (2, 1000), torch.float32, "none")
    want = rectification_kl_reference(clean, adv)
    torch.testing.assert_close(rectification_kl_triton(clean, adv), want, rtol=1e-5, atol=1e-5)


@only_when_triton_runs_elsewhere
def test_kernels_rectify_triton_in_fresh_process():
    """Another module imported triton before TRITON_INTERPRET=1 was set: run this module's Triton tests afresh."""
    run_triton_tests_in_fresh_process(__file__)
