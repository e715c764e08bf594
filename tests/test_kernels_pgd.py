"""Tests for the PGD kernels: Triton (interpreted on CPU) against the reference, and the properties
an attack relies on (budget ball, pixel box, sign(0), L2 projection, backend choice)."""

import pytest
import torch
from kernel_support import needs_triton, only_when_triton_runs_elsewhere, run_triton_tests_in_fresh_process

from ran_peft.kernels.pgd import (
    NORMS,
    kernel_backend,
    pgd_random_start,
    pgd_random_start_reference,
    pgd_random_start_triton,
    pgd_step,
    pgd_step_reference,
    pgd_step_triton,
)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
LOWER = (0 - MEAN) / STD
UPPER = (1 - MEAN) / STD
# Per-channel bounds placed for (..., C, H, W) images: the kernels take any per-element broadcast.
STD_C, LOWER_C, UPPER_C = STD.view(3, 1, 1), LOWER.view(3, 1, 1), UPPER.view(3, 1, 1)
EPS = 8 / 255
STEP = 2 / 255
SHAPES = [(3, 5, 7), (2, 3, 17, 19), (2, 2, 3, 8, 8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _box(shape, dtype=torch.float32, seed=0):
    """Normalised clean pixels, some exactly on the box edges (0 and 1 in pixel units)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(shape, generator=gen)
    pixels.view(-1)[::11] = 0.0
    pixels.view(-1)[5::11] = 1.0
    return ((pixels - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1)).to(dtype)


def _grad(shape, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=gen)
    grad.view(-1)[::7] = 0.0  # sign(0) must be 0
    return grad.to(dtype)


def _kwargs(norm, step=STEP):
    return dict(std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS, step_size=step, norm=norm)


def _plain_linf(delta, grad, clean):
    """The update as a plain sequence of PyTorch ops, straight from the definition."""
    std, lower, upper = STD.view(3, 1, 1), LOWER.view(3, 1, 1), UPPER.view(3, 1, 1)
    new = torch.clamp(delta + (STEP / std) * torch.sign(grad), -EPS / std, EPS / std)
    adv = torch.clamp(clean + new, lower, upper)
    return adv - clean, adv


def _assert_in_budget(delta, clean, norm, eps=EPS):
    pix = delta.float() * STD.view(3, 1, 1)
    if norm == "linf":
        assert pix.abs().max() <= eps * (1 + 1e-5)
    else:
        radius = pix.reshape(-1, pix.shape[-3:].numel()).norm(dim=1)
        assert radius.max() <= eps * (1 + 1e-5)
    adv = clean.float() + delta.float()
    assert (adv >= LOWER.view(3, 1, 1) - 1e-5).all()
    assert (adv <= UPPER.view(3, 1, 1) + 1e-5).all()


# ---------------------------------------------------------------------------- reference behaviour


def test_kernel_pgd_reference_matches_plain_ops():
    clean, grad = _box((2, 3, 9, 9)), _grad((2, 3, 9, 9))
    delta = pgd_random_start_reference(clean, std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS)
    new, adv = pgd_step_reference(delta, grad, clean, **_kwargs("linf"))
    plain_new, plain_adv = _plain_linf(delta, grad, clean)
    torch.testing.assert_close(new, plain_new, rtol=0, atol=1e-6)
    torch.testing.assert_close(adv, plain_adv, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_kernel_pgd_iterates_stay_in_ball_and_box(norm):
    clean = _box((4, 3, 12, 10))
    delta = pgd_random_start_reference(clean, std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS, norm=norm)
    _assert_in_budget(delta, clean, norm)
    for step in range(8):
        delta, adv = pgd_step_reference(
            delta, _grad(clean.shape, seed=step), clean, **_kwargs(norm, step=0.02)
        )
        _assert_in_budget(delta, clean, norm)
        torch.testing.assert_close(adv, clean + delta)


def test_kernel_pgd_linf_budget_is_per_channel_in_pixel_units():
    clean = torch.zeros(1, 3, 4, 4)  # inside the box, far from its edges
    grad = torch.ones_like(clean)
    delta, _ = pgd_step_reference(torch.zeros_like(clean), grad, clean, **_kwargs("linf", step=1.0))
    torch.testing.assert_close(delta[0, :, 0, 0], EPS / STD)


def test_kernel_pgd_zero_gradient_leaves_delta_unchanged():
    clean = torch.zeros(2, 3, 5, 5)
    delta = torch.full_like(clean, 0.01)
    new, _ = pgd_step_reference(delta, torch.zeros_like(clean), clean, **_kwargs("linf"))
    torch.testing.assert_close(new, delta)


def test_kernel_pgd_l2_projects_onto_ball():
    clean = torch.zeros(2, 3, 6, 6)
    grad = torch.randn_like(clean)
    new, _ = pgd_step_reference(torch.zeros_like(clean), grad, clean, **_kwargs("l2", step=10.0))
    pix = new * STD.view(3, 1, 1)
    torch.testing.assert_close(pix.flatten(1).norm(dim=1), torch.full((2,), EPS))
    # The step follows the gradient's direction in pixel units.
    direction = (grad / STD.view(3, 1, 1)).flatten(1)
    cosine = torch.nn.functional.cosine_similarity(pix.flatten(1), direction, dim=1)
    torch.testing.assert_close(cosine, torch.ones(2))


def test_kernel_pgd_l2_small_step_is_not_projected():
    clean = torch.zeros(1, 3, 4, 4)
    new, _ = pgd_step_reference(
        torch.zeros_like(clean), torch.randn_like(clean), clean, **_kwargs("l2", step=0.001)
    )
    torch.testing.assert_close((new * STD.view(3, 1, 1)).norm(), torch.tensor(0.001))


def test_kernel_pgd_random_start_is_reproducible_and_fills_the_ball():
    clean = torch.zeros(4, 3, 16, 16)
    torch.manual_seed(3)
    first = pgd_random_start(clean, std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS)
    torch.manual_seed(3)
    again = pgd_random_start(clean, std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    pix = first * STD.view(3, 1, 1)
    assert pix.abs().max() <= EPS * (1 + 1e-6)
    assert pix.max() > 0.95 * EPS and pix.min() < -0.95 * EPS
    assert pix.mean().abs() < 0.05 * EPS


def test_kernel_pgd_rejects_bad_arguments():
    clean = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="norm='l1'"):
        pgd_step(clean, clean, clean, **_kwargs("l1"))
    with pytest.raises(ValueError, match=r"std must broadcast to delta's shape \(3, 4, 4\)"):
        pgd_step_reference(clean, clean, clean, **{**_kwargs("linf"), "std": torch.ones(2)})
    with pytest.raises(ValueError, match="real must be a bool tensor"):
        pgd_step_reference(clean, clean, clean, **_kwargs("linf"), real=torch.ones(1))
    with pytest.raises(ValueError, match="sample_ndim=4"):
        pgd_step_reference(clean, clean, clean, **_kwargs("l2"), sample_ndim=4)
    with pytest.raises(ValueError, match="grad"):
        pgd_step_reference(clean, clean[:2], clean, **_kwargs("linf"))


# ---------------------------------------------------------------------------- layouts other than (..., C, H, W)


def _patch_rows(rows=12, temporal=2, patch=2):
    """Qwen2-VL-style rows (N, C*T*P*P): channel c holds columns [c*T*P*P, (c+1)*T*P*P)."""
    table = lambda v: v.repeat_interleave(temporal * patch * patch)  # noqa: E731
    return (rows, 3 * temporal * patch * patch), table(STD), table(LOWER), table(UPPER)


def _patch_sequence(batch=2, patches=5, patch=2):
    """SigLIP2 NaFlex (B, N, P*P*C): the channel is the fastest axis of each patch."""
    table = lambda v: v.repeat(patch * patch)  # noqa: E731
    return (batch, patches, patch * patch * 3), table(STD), table(LOWER), table(UPPER)


def _clean_for(shape, std, lower, upper, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(shape, generator=gen)
    return lower + pixels * (upper - lower)  # pixels in [0, 1] normalised with the per-element box


@pytest.mark.parametrize("layout", [_patch_rows, _patch_sequence])
def test_kernel_pgd_linf_budget_is_per_element_in_pixel_units_for_patch_layouts(layout):
    shape, std, lower, upper = layout()
    clean = torch.zeros(shape)  # inside the box, far from its edges
    kwargs = dict(std=std, lower=lower, upper=upper, epsilon=EPS, step_size=1.0, norm="linf")
    delta, _ = pgd_step_reference(torch.zeros(shape), torch.ones(shape), clean, **kwargs)
    torch.testing.assert_close(delta * std, torch.full(shape, EPS))


def test_kernel_pgd_never_moves_padding_and_padding_counts_in_no_norm():
    shape, std, lower, upper = _patch_sequence(batch=2, patches=6)
    clean = _clean_for(shape, std, lower, upper)
    clean[1, 4:] = 0.0  # NaFlex pads with zeros
    real = torch.ones(2, 6, 1, dtype=torch.bool)
    real[1, 4:] = False
    kwargs = dict(std=std, lower=lower, upper=upper, epsilon=EPS, real=real, sample_ndim=2)
    for norm in NORMS:
        delta = pgd_random_start_reference(clean, norm=norm, **kwargs)
        delta, adv = pgd_step_reference(delta, _grad(shape), clean, step_size=10.0, norm=norm, **kwargs)
        assert torch.equal(adv[1, 4:], clean[1, 4:]) and not delta[1, 4:].any()
        pix = (delta * std).flatten(1)
        if norm == "l2":  # projected onto the ball over the real patches only
            torch.testing.assert_close(pix.norm(dim=1), torch.full((2,), EPS))
        else:
            assert pix.abs().amax(dim=1).tolist() == pytest.approx([EPS, EPS], abs=1e-7)


def test_kernel_pgd_l2_ball_is_per_sample_of_sample_ndim_trailing_dims():
    shape, std, lower, upper = _patch_sequence(batch=3, patches=4)
    kwargs = dict(std=std, lower=lower, upper=upper, epsilon=EPS, step_size=10.0, norm="l2", sample_ndim=2)
    new, _ = pgd_step_reference(torch.zeros(shape), torch.randn(shape), torch.zeros(shape), **kwargs)
    torch.testing.assert_close((new * std).flatten(1).norm(dim=1), torch.full((3,), EPS))


# ---------------------------------------------------------------------------- dispatcher


def test_kernel_backend_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("RAN_PEFT_KERNELS", raising=False)
    assert kernel_backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("RAN_PEFT_KERNELS", "torch")
    assert kernel_backend(torch.zeros(1)) == "torch"


def test_kernel_backend_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("RAN_PEFT_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"RAN_PEFT_KERNELS='cuda'.*auto, triton, torch"):
        kernel_backend()


def test_kernel_pgd_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("RAN_PEFT_KERNELS", raising=False)
    clean, grad = _box((2, 3, 5, 5)), _grad((2, 3, 5, 5))
    delta = torch.zeros_like(clean)
    got = pgd_step(delta, grad, clean, **_kwargs("linf"))
    want = pgd_step_reference(delta, grad, clean, **_kwargs("linf"))
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=0, atol=0)


# ---------------------------------------------------------------------------- Triton (interpreted)


def _tolerance(dtype):
    # float32: rounding only. Half types: one unit in the last place of the stored result.
    return {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5)}[dtype]


@needs_triton
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_pgd_step_triton_matches_reference(shape, dtype, norm):
    clean, grad = _box(shape, dtype), _grad(shape, dtype)
    delta = pgd_random_start_reference(clean, std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS, norm=norm)
    rtol, atol = _tolerance(dtype)
    want = pgd_step_reference(delta, grad, clean, **_kwargs(norm))
    got = pgd_step_triton(delta, grad, clean, **_kwargs(norm))
    for got_t, want_t in zip(got, want, strict=True):
        assert got_t.dtype == dtype and got_t.shape == shape
        torch.testing.assert_close(got_t, want_t, rtol=rtol, atol=atol)


@needs_triton
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_kernel_pgd_step_triton_mixed_grad_dtype(norm):
    clean = _box((2, 3, 7, 5))
    delta = torch.zeros_like(clean)
    grad = _grad(clean.shape, torch.bfloat16)
    got = pgd_step_triton(delta, grad, clean, **_kwargs(norm))
    want = pgd_step_reference(delta, grad, clean, **_kwargs(norm))
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_pgd_random_start_triton_in_ball_and_box(norm, dtype):
    clean = _box((2, 3, 9, 11), dtype)
    delta = pgd_random_start_triton(clean, std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS, norm=norm)
    assert delta.dtype == dtype and delta.shape == clean.shape
    _assert_in_budget(delta, clean, norm, eps=EPS * (1.01 if dtype != torch.float32 else 1))
    assert delta.float().abs().sum() > 0


@needs_triton
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_kernel_pgd_random_start_triton_distribution_and_seed(norm):
    clean = torch.zeros(8, 3, 16, 16)  # far from the box edges: no clipping
    kwargs = dict(std=STD_C, lower=LOWER_C, upper=UPPER_C, epsilon=EPS, norm=norm)
    torch.manual_seed(7)
    first = pgd_random_start_triton(clean, **kwargs)
    torch.manual_seed(7)
    again = pgd_random_start_triton(clean, **kwargs)
    other = pgd_random_start_triton(clean, **kwargs, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    pix = first * STD.view(3, 1, 1)
    if norm == "linf":
        assert pix.max() > 0.95 * EPS and pix.min() < -0.95 * EPS
        assert pix.mean().abs() < 0.05 * EPS
    else:
        radius = pix.flatten(1).norm(dim=1)
        assert radius.max() <= EPS * (1 + 1e-5) and radius.std() > 0


@needs_triton
def test_kernel_dispatcher_forced_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("RAN_PEFT_KERNELS", "triton")
    assert kernel_backend(torch.zeros(1)) == "triton"
    clean, grad = _box((2, 3, 5, 5)), _grad((2, 3, 5, 5))
    delta = torch.zeros_like(clean)
    got = pgd_step(delta, grad, clean, **_kwargs("linf"))
    want = pgd_step_triton(delta, grad, clean, **_kwargs("linf"))
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=0, atol=0)


def _padded_images():
    """Idefics3-style padded batch (B, I, C, H, W) with a per-pixel mask (B, I, 1, H, W): not one adjacent block of
    dims, so the launcher expands it once rather than indexing it compactly."""
    clean = _box((2, 2, 3, 6, 5))
    real = torch.ones(2, 2, 1, 6, 5, dtype=torch.bool)
    real[1, 1] = False  # a padding image
    real[0, 1, :, 4:] = False  # padded rows of a smaller image
    clean[1, 1] = 0.0
    return clean, dict(std=STD_C, lower=LOWER_C, upper=UPPER_C, real=real, sample_ndim=3)


def _patch_cases():
    rows, std_r, lower_r, upper_r = _patch_rows(rows=9)
    seq, std_s, lower_s, upper_s = _patch_sequence(batch=2, patches=7)
    real = torch.ones(2, 7, 1, dtype=torch.bool)
    real[0, 5:] = False
    return [
        (
            _clean_for(rows, std_r, lower_r, upper_r),
            dict(std=std_r, lower=lower_r, upper=upper_r, sample_ndim=2),
        ),
        (
            _clean_for(seq, std_s, lower_s, upper_s),
            dict(std=std_s, lower=lower_s, upper=upper_s, real=real, sample_ndim=2),
        ),
        _padded_images(),
    ]


@needs_triton
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("case", range(3), ids=["patch_rows", "patch_sequence_padded", "padded_images"])
def test_kernel_pgd_triton_matches_reference_on_every_layout(case, norm):
    clean, placement = _patch_cases()[case]
    grad = _grad(clean.shape)
    delta = pgd_random_start_reference(clean, epsilon=EPS, norm=norm, **placement)
    want = pgd_step_reference(delta, grad, clean, epsilon=EPS, step_size=STEP, norm=norm, **placement)
    got = pgd_step_triton(delta, grad, clean, epsilon=EPS, step_size=STEP, norm=norm, **placement)
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=1e-6, atol=1e-6)
    start = pgd_random_start_triton(clean, epsilon=EPS, norm=norm, **placement)
    real = placement.get("real")
    if real is not None:
        assert not start[~real.expand(clean.shape)].any()
    pix = start * placement["std"]
    assert pix.abs().max() <= EPS * (1 + 1e-5) and pix.abs().sum() > 0


@only_when_triton_runs_elsewhere
def test_kernels_pgd_triton_in_fresh_process():
    """Another module imported triton before TRITON_INTERPRET=1 was set: run this module's Triton tests afresh."""
    run_triton_tests_in_fresh_process(__file__)
