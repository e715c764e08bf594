"""Medical image-caption data with one set of columns (`image`, `caption`, `label`, metadata), one module per
concept: `synthetic` (the procedural benchmark), `loaders` (image folders, DICOM, Hub, MedMNIST) and `collation`
(class prompts and the batch collator). Every public name is importable from `ran_peft.data`.
"""

from ran_peft.data.collation import (
    ImageTextCollator,
    class_prompts,
    tokenize_class_prompts,
)
from ran_peft.data.loaders import (
    DEFAULT_CAPTION_TEMPLATE,
    MAX_LISTED_UNREADABLE,
    UnreadableDicomError,
    dicom_to_image,
    load_dataset_any,
    load_dicom_folder,
    load_hub_dataset,
    load_image_folder,
    load_medmnist,
    standardize_columns,
)
from ran_peft.data.synthetic import (
    ANATOMIES,
    FINDINGS,
    LATERALITIES,
    MODALITIES,
    SYNTHETIC_TASKS,
    synthetic_caption_texts,
    synthetic_medical_dataset,
)

__all__ = [
    "MAX_LISTED_UNREADABLE",
    "ANATOMIES",
    "DEFAULT_CAPTION_TEMPLATE",
    "FINDINGS",
    "ImageTextCollator",
    "LATERALITIES",
    "MODALITIES",
    "SYNTHETIC_TASKS",
    "UnreadableDicomError",
    "class_prompts",
    "dicom_to_image",
    "load_dataset_any",
    "load_dicom_folder",
    "load_hub_dataset",
    "load_image_folder",
    "load_medmnist",
    "standardize_columns",
    "synthetic_caption_texts",
    "synthetic_medical_dataset",
    "tokenize_class_prompts",
]
