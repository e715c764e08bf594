"""Noisy upstream data made on purpose, one module per attack: `captions` (medical term swaps), `images` (targeted
PGD under a surrogate VLM) and `dataset` (the seeded dataset transform that applies them and records each change).

RAN's premise is that upstream (pre-training) data holds such noise; this package makes it, so that the effect of
the noise level can be measured. Every public name is importable from `ran_peft.noise`.
"""

from ran_peft.noise.captions import (
    FALLBACK_NEGATION,
    MEDICAL_TERM_GROUPS,
    NEGATION_BLOCKED_AFTER,
    NEGATION_SWAPS,
    SIZE_FACTORS,
    substitute_medical_terms,
)
from ran_peft.noise.dataset import (
    NOISE_COLUMNS,
    NOISE_MODES,
    add_adversarial_noise,
    noisy_rows,
)
from ran_peft.noise.images import (
    SurrogateVLM,
)

__all__ = [
    "FALLBACK_NEGATION",
    "MEDICAL_TERM_GROUPS",
    "NEGATION_BLOCKED_AFTER",
    "NEGATION_SWAPS",
    "NOISE_COLUMNS",
    "NOISE_MODES",
    "SIZE_FACTORS",
    "SurrogateVLM",
    "add_adversarial_noise",
    "noisy_rows",
    "substitute_medical_terms",
]
