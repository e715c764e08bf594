import pytest
import torch

from ran_peft import covariance_offdiagonal, feature_consistency, rectification_kl, spectrum_flatness


def test_kl_is_zero_for_identical_predictions_and_positive_otherwise():
    logits = torch.randn(5, 11)
    assert rectification_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn(5, 11)
    value = rectification_kl(logits, other)
    reference = torch.nn.functional.kl_div(
        other.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)


def test_kl_mask_skips_ignored_rows():
    clean, adversarial = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[True, False, True, False], [False, False, True, False]])
    expected = rectification_kl(clean[mask], adversarial[mask])
    assert rectification_kl(clean, adversarial, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        rectification_kl(torch.randn(3, 5), torch.randn(3, 6))


def test_covariance_is_zero_for_decorrelated_features_and_one_for_copies():
    decorrelated = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert covariance_offdiagonal(decorrelated).item() == pytest.approx(0.0, abs=1e-6)
    column = torch.randn(16, 1)
    copies = column.repeat(1, 4)
    assert covariance_offdiagonal(copies).item() == pytest.approx(1.0, rel=1e-3)


def test_spectrum_flatness_is_zero_for_low_rank_and_high_for_isotropic_features():
    low_rank = torch.randn(32, 1) @ torch.randn(1, 16)
    assert spectrum_flatness(low_rank, top_k=1).item() == pytest.approx(0.0, abs=1e-5)
    isotropic = torch.randn(256, 16)
    assert spectrum_flatness(isotropic, top_k=1).item() > 0.8
    value = spectrum_flatness(isotropic.requires_grad_(), top_k=4)
    value.backward()
    assert torch.isfinite(isotropic.grad).all()


def test_consistency_pulls_towards_a_stopped_reference():
    reference = torch.randn(4, 8, requires_grad=True)
    adversarial = reference.detach() + 0.5
    adversarial.requires_grad_(True)
    value = feature_consistency(adversarial, reference)
    assert value.item() == pytest.approx(8 * 0.25)
    value.backward()
    assert reference.grad is None and adversarial.grad is not None
