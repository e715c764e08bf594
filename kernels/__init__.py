"""Fused kernels for RAN, each beside its plain-PyTorch reference.

PGD update and random start for the attack, and the rectification KL; a dispatcher picks Triton on CUDA.
"""

from .dispatch import ALLOWED_BACKENDS, ENV_VAR, kernel_backend
from .pgd import (
    pgd_random_start,
    pgd_random_start_reference,
    pgd_random_start_triton,
    pgd_step,
    pgd_step_reference,
    pgd_step_triton,
)
from .rectify import (
    RectificationKLFunction,
    rectification_kl,
    rectification_kl_chunked,
    rectification_kl_reference,
    rectification_kl_triton,
)

__all__ = [
    "ALLOWED_BACKENDS",
    "ENV_VAR",
    "RectificationKLFunction",
    "kernel_backend",
    "pgd_random_start",
    "pgd_random_start_reference",
    "pgd_random_start_triton",
    "pgd_step",
    "pgd_step_reference",
    "pgd_step_triton",
    "rectification_kl",
    "rectification_kl_chunked",
    "rectification_kl_reference",
    "rectification_kl_triton",
]
