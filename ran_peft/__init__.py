"""ran_peft: robust fine-tuning of vision-language models with RAN (Rectify Adversarial Noise) as a PEFT adapter.

`get_peft_model(model, RANConfig(...))` builds the adapter; `RANCallback` makes the stock Trainer train it.
"""

# Before anything imports bitsandbytes (peft and transformers' Trainer do): its Hub-kernel notice is told only
# where 4-bit layers are used (`ran_peft.quantization`).
from ran_peft.quantization import quiet_bitsandbytes_import_notice

quiet_bitsandbytes_import_notice()

# Registers open_clip's family detector with `detect_family` (open_clip itself is imported only to load a model).
import ran_peft.open_clip  # noqa: F401
from ran_peft.attacks import (
    AttackBudget,
    AttackReport,
    AttackSkippedWarning,
    TextPerturbation,
    attack_mode,
    deterministic_training_mode,
    pgd_perturb,
)
from ran_peft.callback import RANCallback, find_ran_config
from ran_peft.config import RAN_CONFIG_NAME, RANConfig
from ran_peft.data import (
    ImageTextCollator,
    class_prompts,
    load_dataset_any,
    load_dicom_folder,
    load_hub_dataset,
    load_image_folder,
    load_medmnist,
    synthetic_medical_dataset,
    tokenize_class_prompts,
)
from ran_peft.evaluation import (
    GradientMaskingWarning,
    RobustnessReport,
    clean_accuracy,
    evaluate_robustness,
    format_epsilon,
    gradient_masking_checks,
    parse_epsilon,
    prediction_correctness,
)
from ran_peft.families import (
    DualEncoderFamily,
    GenerativeFamily,
    ImageClassifierFamily,
    ModelFamily,
    UnsupportedModelError,
    detect_family,
)
from ran_peft.losses import covariance_offdiagonal, feature_consistency, rectification_kl, spectrum_flatness
from ran_peft.noise import (
    MEDICAL_TERM_GROUPS,
    NEGATION_SWAPS,
    SurrogateVLM,
    add_adversarial_noise,
    noisy_rows,
    substitute_medical_terms,
)
from ran_peft.pixel_layout import (
    PIXEL_LAYOUTS,
    BatchPixelBox,
    ChannelsFirstLayout,
    PatchRowLayout,
    PatchSequenceLayout,
    PixelLayout,
    PixelLayoutError,
    resolve_pixel_layout,
)
from ran_peft.pixels import PixelBox
from ran_peft.recipe_memory import RecipeMemory
from ran_peft.representation import (
    image_features,
    linear_probe_accuracy,
    retrieval_recall_at_k,
    zero_shot_accuracy,
)
from ran_peft.training import (
    PixelIndependentWarning,
    RANOutput,
    RANTrainingWrapper,
    UnattackedPixelsWarning,
    ran_loss,
    resolve_pixel_box,
)
from ran_peft.version import __version__ as __version__

__all__ = [
    "AttackReport",
    "AttackSkippedWarning",
    "ImageTextCollator",
    "class_prompts",
    "load_dataset_any",
    "load_dicom_folder",
    "load_hub_dataset",
    "load_image_folder",
    "load_medmnist",
    "synthetic_medical_dataset",
    "tokenize_class_prompts",
    "GradientMaskingWarning",
    "RobustnessReport",
    "clean_accuracy",
    "evaluate_robustness",
    "format_epsilon",
    "gradient_masking_checks",
    "image_features",
    "linear_probe_accuracy",
    "parse_epsilon",
    "prediction_correctness",
    "retrieval_recall_at_k",
    "zero_shot_accuracy",
    "MEDICAL_TERM_GROUPS",
    "NEGATION_SWAPS",
    "RAN_CONFIG_NAME",
    "AttackBudget",
    "DualEncoderFamily",
    "GenerativeFamily",
    "ImageClassifierFamily",
    "ModelFamily",
    "PixelBox",
    "PIXEL_LAYOUTS",
    "BatchPixelBox",
    "ChannelsFirstLayout",
    "PatchRowLayout",
    "PatchSequenceLayout",
    "PixelIndependentWarning",
    "PixelLayout",
    "PixelLayoutError",
    "resolve_pixel_layout",
    "RANCallback",
    "RANConfig",
    "RANOutput",
    "RANTrainingWrapper",
    "RecipeMemory",
    "SurrogateVLM",
    "TextPerturbation",
    "UnattackedPixelsWarning",
    "UnsupportedModelError",
    "add_adversarial_noise",
    "attack_mode",
    "deterministic_training_mode",
    "covariance_offdiagonal",
    "detect_family",
    "feature_consistency",
    "find_ran_config",
    "noisy_rows",
    "pgd_perturb",
    "ran_loss",
    "rectification_kl",
    "resolve_pixel_box",
    "spectrum_flatness",
    "substitute_medical_terms",
]
