"""The rectification terms of the RAN loss, as pure functions of logits and features.

The KL term goes through the fused-kernel dispatcher; the feature terms act on pooled image features `[B, D]`.
"""

from __future__ import annotations

import torch

from ran_peft.kernels.rectify import rectification_kl as _fused_kl


def rectification_kl(
    clean_logits: torch.Tensor,
    adversarial_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    detach_clean: bool = False,
) -> torch.Tensor:
    """Mean over counted rows of KL(p_clean || p_adversarial), softmax over the last dim (fused, chunked)."""
    if clean_logits.shape != adversarial_logits.shape:
        raise ValueError(
            f"clean logits {tuple(clean_logits.shape)} and adversarial logits {tuple(adversarial_logits.shape)} "
            "must have the same shape."
        )
    return _fused_kl(
        clean_logits, adversarial_logits, mask, temperature=temperature, detach_clean=detach_clean
    )


def feature_consistency(adversarial_features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of adversarial features to the (stop-gradient) pre-trained clean features."""
    return (adversarial_features.float() - reference_features.detach().float()).pow(2).sum(-1).mean()


def _centred(features: torch.Tensor) -> torch.Tensor:
    features = features.float().flatten(1)
    return features - features.mean(dim=0, keepdim=True)


def covariance_offdiagonal(features: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of the batch correlation matrix of the features, in [0, 1].

    Zero when the feature dimensions are uncorrelated over the batch; needs a batch of at least 2.
    """
    if features.shape[0] < 2:
        return features.float().sum() * 0.0
    centred = _centred(features)
    degrees = features.shape[0] - 1
    centred = centred / (centred.pow(2).sum(dim=0, keepdim=True).div(degrees).sqrt() + 1e-6)
    covariance = centred.T @ centred / degrees
    off_diagonal = covariance - torch.diag_embed(torch.diagonal(covariance))
    dimension = covariance.shape[0]
    return off_diagonal.pow(2).sum() / max(dimension * (dimension - 1), 1)


def spectrum_flatness(features: torch.Tensor, top_k: int) -> torch.Tensor:
    """`1 -` the share of the top-k squared singular values of the centred batch features, in [0, 1].

    Noisy pre-training flattens the feature spectrum; lowering this term keeps its dominant directions strong.
    """
    if features.shape[0] < 2:
        return features.float().sum() * 0.0
    singular_values = torch.linalg.svdvals(_centred(features))
    energy = singular_values.pow(2)
    total = energy.sum()
    if total <= 0:
        return features.float().sum() * 0.0
    return 1.0 - energy[:top_k].sum() / total
