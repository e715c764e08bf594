"""Real medical data in the project's columns (`image`, `caption`, `label`, metadata): image folders, DICOM folders,
Hub datasets, MedMNIST."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from ran_peft.data.synthetic import synthetic_medical_dataset

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Real data: captions from class names, image folders, DICOM folders, Hub datasets, MedMNIST
# --------------------------------------------------------------------------------------------------------------

DEFAULT_CAPTION_TEMPLATE = "An image of {}."


def _class_caption(name: str, template: str = DEFAULT_CAPTION_TEMPLATE) -> str:
    return template.format(name.replace("_", " "))


def _fail_column(field: str, column: str, available: Sequence[str], source: str) -> None:
    raise ValueError(
        f"{field}={column!r}: {source} has no such column; available columns: {sorted(available)}."
    )


def standardize_columns(
    dataset: datasets.Dataset,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    label_column: str | None = None,
    source: str = "the dataset",
) -> datasets.Dataset:
    """Rename a dataset's columns to ours: `image` (an `Image` feature), `caption`, and `label` when it has one.

    `caption_column=None` keeps a `caption` column if there is one, else writes "An image of <class>." from a
    `ClassLabel` label. `label_column=None` keeps a `label` column if there is one. Other columns stay as they are.

    Raises:
        ValueError: a named column is missing (the message lists the available ones), the image column holds
            neither images nor paths/bytes, or there is neither a caption column nor a `ClassLabel` label.
    """
    available = list(dataset.column_names)
    for field, column in (
        ("image_column", image_column),
        ("caption_column", caption_column),
        ("label_column", label_column),
    ):
        if column is not None and column not in available:
            _fail_column(field, column, available, source)

    renames = {image_column: "image"}
    if caption_column is not None:
        renames[caption_column] = "caption"
    if label_column is not None:
        renames[label_column] = "label"
    renames = {old: new for old, new in renames.items() if old != new}
    # The user named the source column, so a column already called like the target is replaced by it.
    clashing = [new for new in renames.values() if new in available and new not in renames]
    if clashing:
        logger.info("standardize_columns: replacing the existing column(s) %s of %s.", clashing, source)
        dataset = dataset.remove_columns(clashing)
    if renames:
        dataset = dataset.rename_columns(renames)

    image_feature = dataset.features["image"]
    if not isinstance(image_feature, datasets.Image):
        if isinstance(image_feature, datasets.Value) and image_feature.dtype in (
            "string",
            "large_string",
            "binary",
        ):
            dataset = dataset.cast_column("image", datasets.Image())
        else:
            raise ValueError(
                f"image_column={image_column!r} of {source} holds {image_feature}, not images: it must be an "
                "`Image` feature, or file paths or encoded bytes that `datasets.Image` can decode."
            )

    if "caption" not in dataset.column_names:
        label_feature = dataset.features.get("label")
        if not isinstance(label_feature, datasets.ClassLabel):
            raise ValueError(
                f"{source} has no captions: pass caption_column (one of {sorted(dataset.column_names)}) or a "
                "label_column that is a `ClassLabel`, from whose class names captions are written."
            )
        names = label_feature.names
        dataset = dataset.map(
            lambda batch: {"caption": [_class_caption(names[label]) for label in batch["label"]]},
            batched=True,
            desc="captions from class names",
        )
    return dataset


def _existing_directory(path: str | Path, field: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        state = "is a file" if directory.exists() else "does not exist"
        raise ValueError(f"{field}={str(path)!r} {state}: it must be an existing directory.")
    return directory


def load_image_folder(
    path: str | Path,
    *,
    label_from: str = "folder",
    captions: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """An image folder (`datasets`' "imagefolder" builder) with our columns: `image`, `caption`, `label`.

    Layout: `path/<class name>/<image>` (labels from the sub-folder names), optionally split into
    `path/train/...`, `path/test/...`, and optionally a `metadata.csv` / `metadata.jsonl` beside the images with a
    `file_name` column and more columns (e.g. captions), which are kept.

    Args:
        label_from: "folder" (the `label` column, a `ClassLabel` of the sub-folder names) or "none".
        captions: the metadata column holding the captions. Default: a `caption` or `text` column if there is
            one, else "An image of <class name>." from the folder label.
        split: which split to load ("train" when the folder has no split sub-folders).
        cache_dir: where `datasets` caches the built dataset (default: its usual cache).
    """
    root = _existing_directory(path, "path")
    if label_from not in ("folder", "none"):
        raise ValueError(f"label_from={label_from!r} is not allowed: it must be 'folder' or 'none'.")
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(root), split=split, drop_labels=label_from == "none", cache_dir=cache_dir
    )
    source = f"the image folder {root.name!r}"
    if label_from == "folder" and "label" not in dataset.column_names:
        # `datasets` drops the folder labels as soon as there is a metadata file; put them back.
        dataset = _labels_from_folders(dataset)
    if captions is None:
        captions = next((name for name in ("caption", "text") if name in dataset.column_names), None)
    elif captions not in dataset.column_names:
        _fail_column("captions", captions, dataset.column_names, f"{source} (with its metadata file)")
    if captions is None and label_from == "none":
        raise ValueError(
            f"{source} has no captions and label_from='none': add a metadata.csv/jsonl with a caption column, "
            "or use label_from='folder' to write captions from the class names."
        )
    return standardize_columns(dataset, caption_column=captions, source=source)


def _labels_from_folders(dataset: datasets.Dataset) -> datasets.Dataset:
    paths = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    folders = [Path(item["path"]).parent.name for item in paths]
    names = sorted(set(folders))
    return dataset.add_column(
        "label", [names.index(folder) for folder in folders], feature=datasets.ClassLabel(names=names)
    )


_DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MODALITY_NAMES = {
    "CT": "CT",
    "MR": "MRI",
    "CR": "X-ray",
    "DX": "X-ray",
    "DR": "X-ray",
    "RG": "X-ray",
    "RF": "fluoroscopy",
    "XA": "angiography",
    "US": "ultrasound",
    "MG": "mammography",
    "PT": "PET",
    "NM": "nuclear medicine",
    "OT": "medical",
    "SC": "medical",
}
_PATIENT_POSITIONS = {
    "HFS": "head first, supine",
    "HFP": "head first, prone",
    "FFS": "feet first, supine",
    "FFP": "feet first, prone",
    "HFDR": "head first, decubitus right",
    "HFDL": "head first, decubitus left",
    "FFDR": "feet first, decubitus right",
    "FFDL": "feet first, decubitus left",
}


# How many unreadable files a folder's error lists by name (the rest are counted).
MAX_LISTED_UNREADABLE = 10


class UnreadableDicomError(ValueError):
    """A DICOM file that cannot be turned into an image: not DICOM, truncated, or without pixel data."""


def _dicom_files(root: Path, recursive: bool) -> list[Path]:
    candidates = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in _DICOM_SUFFIXES)


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _scan_plane(orientation: Any) -> str | None:
    if orientation is None or len(orientation) != 6:
        return None
    row, column = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    # The slice normal's main axis: x (patient left-right) -> sagittal, y -> coronal, z -> axial.
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(np.cross(row, column))))]


def _dicom_caption(ds: Any) -> tuple[str, str, str | None]:
    code = str(ds.get("Modality", "") or "").strip().upper()
    modality = _DICOM_MODALITY_NAMES.get(code, code or "medical")
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().lower().replace("_", " ") or None
    caption = f"{modality} of the {body_part}" if body_part else f"{modality} image"
    plane = _scan_plane(ds.get("ImageOrientationPatient"))
    details = [plane] if plane else []
    position = str(ds.get("PatientPosition", "") or "").strip().upper()
    if position:
        details.append(_PATIENT_POSITIONS.get(position, position.lower()))
    if details:
        caption += f" ({', '.join(details)})"
    descriptions = [str(ds.get(tag, "") or "").strip() for tag in ("StudyDescription", "SeriesDescription")]
    descriptions = [d for i, d in enumerate(descriptions) if d and d not in descriptions[:i]]
    if descriptions:
        caption += ". " + "; ".join(descriptions)
    return caption.rstrip(".") + ".", modality, body_part


def _window_to_uint8(pixels: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is not None:
        center, width = window
        low, high = center - width / 2.0, center + width / 2.0
    else:
        low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round(np.clip((pixels - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def dicom_to_image(ds: Any, window: tuple[float, float] | None = None) -> Image.Image:
    """An 8-bit RGB image of a pydicom dataset's pixels.

    Grey images: the rescale slope/intercept are applied, then a linear window: the file's WindowCenter and
    WindowWidth when present, else `window` (center, width) in rescaled units, else the pixels' min-max.
    MONOCHROME1 is inverted. Multi-frame files give their middle frame. Colour images are scaled to 8 bits.
    """
    pixels = ds.pixel_array
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels, samples = apply_color_lut(pixels, ds), 3  # indices -> RGB through the file's own palette
    if samples > 1:
        if pixels.dtype != np.uint8:
            pixels = _window_to_uint8(pixels.astype(np.float32), None)
        return Image.fromarray(pixels).convert("RGB")
    slope = _first_number(ds.get("RescaleSlope")) or 1.0
    intercept = _first_number(ds.get("RescaleIntercept")) or 0.0
    values = pixels.astype(np.float32) * slope + intercept
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        window = (center, width)
    grey = _window_to_uint8(values, window)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey).convert("RGB")


def _read_without_file_meta(path: Path) -> Any:
    """A file without the 'DICM' header and file meta (ACR-NEMA style, as older exports write) that still holds an
    image, with the transfer syntax its encoding implies; None when it is not one."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
            return None
        implicit, little = ds.original_encoding
    except Exception:  # garbage read by force: not an image
        return None
    if implicit is None:
        return None
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    return ds


def _read_dicom(path: Path, window: tuple[float, float] | None) -> tuple[Image.Image, Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as error:
        ds = _read_without_file_meta(path)
        if ds is None:
            raise UnreadableDicomError(
                f"DICOM file {str(path)!r} is not a valid DICOM file: {error}"
            ) from error
    except Exception as error:  # pydicom raises many kinds on truncated or corrupt files
        raise UnreadableDicomError(
            f"DICOM file {str(path)!r} cannot be read: {type(error).__name__}: {error}"
        ) from error
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        modality = ds.get("Modality", "unknown")
        raise UnreadableDicomError(
            f"DICOM file {str(path)!r} has no pixel data (Modality {modality}): it is not an image, or its pixel data is cut short."
        )
    try:
        image = dicom_to_image(ds, window)
    except Exception as error:  # decoding: truncated pixel data, missing codec, bad tags
        raise UnreadableDicomError(
            f"DICOM file {str(path)!r} has pixel data that cannot be decoded: {type(error).__name__}: {error}"
        ) from error
    return image, ds


def load_dicom_folder(
    path: str | Path,
    *,
    window: tuple[float, float] | None = None,
    recursive: bool = True,
    skip_unreadable: bool = False,
) -> datasets.Dataset:
    """Every DICOM file (`*.dcm`, `*.dicom`) under `path` as a dataset: `image` (8-bit RGB), `caption`,
    `modality`, `body_part` and `source_path`.

    Pixels go through `dicom_to_image` (rescale, then the file's window, else `window`, else min-max). The
    caption is built from the tags Modality, BodyPartExamined, ImageOrientationPatient (scan plane),
    PatientPosition, StudyDescription and SeriesDescription, e.g. "CT of the head (axial, head first, supine).";
    `modality` uses the synthetic benchmark's names where they exist (CT, MRI, X-ray, ultrasound).
    `source_path` is relative to `path`, so no user directory leaks into data that may be shared.

    Args:
        window: (center, width) for files without WindowCenter/WindowWidth, in rescaled units (e.g. HU).
        recursive: also look in sub-folders.
        skip_unreadable: skip files that are not readable DICOM images (logged, counted in the dataset's
            `info.description`) instead of raising.

    Raises:
        UnreadableDicomError (a ValueError): some files are not DICOM, are truncated, hold no image or cannot
            be decoded, and `skip_unreadable` is False. The message counts them, names each (up to 10) with
            its reason, and points to `skip_unreadable=True`.
        ValueError: `path` is not a directory or holds no readable DICOM image.
    """
    root = _existing_directory(path, "path")
    if window is not None:
        if len(window) != 2 or not float(window[1]) > 0:
            raise ValueError(f"window={window!r} is not allowed: it must be (center, width) with width > 0.")
        window = (float(window[0]), float(window[1]))
    files = _dicom_files(root, recursive)
    if not files:
        where = "under" if recursive else "in"
        raise ValueError(f"path={str(path)!r}: no DICOM files ({', '.join(_DICOM_SUFFIXES)}) {where} it.")

    columns: dict[str, list] = {
        "image": [],
        "caption": [],
        "modality": [],
        "body_part": [],
        "source_path": [],
    }
    skipped: list[str] = []
    failures: list[UnreadableDicomError] = []
    for file in files:
        relative = file.relative_to(root).as_posix()
        try:
            image, ds = _read_dicom(file, window)
        except UnreadableDicomError as error:
            if not skip_unreadable:
                failures.append(error)
                continue
            logger.warning("Skipping %s: %s", relative, error)
            skipped.append(relative)
            continue
        caption, modality, body_part = _dicom_caption(ds)
        columns["image"].append(image)
        columns["caption"].append(caption)
        columns["modality"].append(modality)
        columns["body_part"].append(body_part)
        columns["source_path"].append(relative)
    if failures:
        shown = "\n".join(f"  - {error}" for error in failures[:MAX_LISTED_UNREADABLE])
        more = len(failures) - MAX_LISTED_UNREADABLE
        if more > 0:
            shown += f"\n  ... and {more} more"
        raise UnreadableDicomError(
            f"path={str(path)!r}: {len(failures)} of {len(files)} DICOM files cannot be read as images "
            f"({len(files) - len(failures)} can):\n{shown}\nPass `skip_unreadable=True` to load the others and "
            "skip these (they are logged and listed in the dataset's `info.description`)."
        )
    if skipped:
        logger.warning(
            "Skipped %d of %d DICOM files under %s as unreadable.", len(skipped), len(files), root.name
        )
    if not columns["image"]:
        raise ValueError(f"path={str(path)!r}: none of its {len(files)} DICOM files is a readable image.")

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "modality": datasets.Value("string"),
            "body_part": datasets.Value("string"),
            "source_path": datasets.Value("string"),
        }
    )
    description = f"DICOM folder {root.name!r}: {len(columns['image'])} images"
    if skipped:
        description += f"; skipped {len(skipped)} unreadable files: {', '.join(skipped)}"
    info = datasets.DatasetInfo(description=description + ".", features=features)
    return datasets.Dataset.from_dict(columns, info=info)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_hub_dataset(
    name: str,
    *,
    split: str = "train",
    image_column: str = "image",
    caption_column: str | None = None,
    label_column: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> datasets.Dataset:
    """A Hugging Face Hub dataset (or a local dataset folder) with our columns, via `standardize_columns`.

    `name` is a Hub id ("owner/name"), a local folder `datasets.load_dataset` can read (parquet, csv, images),
    or a folder written by `Dataset.save_to_disk`. Remote code is never run unless `trust_remote_code=True`
    (recent `datasets` versions ignore it: they no longer run dataset scripts).

    Raises:
        ValueError: a named column is missing (the message lists the available ones), or `split` is missing
            from a saved `DatasetDict`.
    """
    local = Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"split={split!r}: the saved dataset {local.name!r} has splits {sorted(loaded)}."
                )
            loaded = loaded[split]
        source = f"the saved dataset {local.name!r}"
    else:
        options: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
        loaded = datasets.load_dataset(name, split=split, revision=revision, **options)
        source = f"dataset {name!r} (split {split!r})"
    return standardize_columns(
        loaded,
        image_column=image_column,
        caption_column=caption_column,
        label_column=label_column,
        source=source,
    )


def load_medmnist(
    flag: str = "pathmnist", split: str = "train", size: int = 28, root: str | None = None
) -> datasets.Dataset:
    """A MedMNIST dataset (single-label ones) through the `medmnist` package: `image`, `caption`, `label`.

    Needs `pip install medmnist` and network access the first time (it downloads from Zenodo into `root`,
    default `~/.medmnist`). Captions are "An image of <class>." from MedMNIST's class names.

    Raises:
        ImportError: `medmnist` is not installed.
        ValueError: unknown `flag`, `split` or `size`, or a multi-label flag (e.g. chestmnist).
    """
    try:
        import medmnist
    except ImportError as error:
        raise ImportError(
            "load_medmnist needs the `medmnist` package, which is not installed: run `pip install medmnist`. "
            "It downloads the data from Zenodo, so the first call needs network access."
        ) from error
    if flag not in medmnist.INFO:
        raise ValueError(f"flag={flag!r} is not a MedMNIST dataset; known flags: {sorted(medmnist.INFO)}.")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not allowed: it must be 'train', 'val' or 'test'.")
    if size not in (28, 64, 128, 224):
        raise ValueError(f"size={size!r} is not allowed: MedMNIST images are 28, 64, 128 or 224 pixels.")
    info = medmnist.INFO[flag]
    if "multi-label" in info["task"]:
        raise ValueError(
            f"flag={flag!r} is a multi-label task ({info['task']}); only single-label flags are supported."
        )
    options: dict[str, Any] = {"split": split, "download": True}
    if size != 28:
        options["size"] = size
    if root is not None:
        options["root"] = root
    source = getattr(medmnist, info["python_class"])(**options)
    names = [info["label"][key] for key in sorted(info["label"], key=int)]
    labels = np.asarray(source.labels).reshape(len(source.labels), -1)[:, 0].astype(int).tolist()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(np.asarray(pixels)).convert("RGB") for pixels in source.imgs],
            "caption": [_class_caption(names[label]) for label in labels],
            "label": labels,
        },
        features=features,
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def load_dataset_any(spec: str, **kwargs: Any) -> datasets.Dataset:
    """Load by a single string: the synthetic benchmark, a local folder, or a Hub dataset.

    - "synthetic" or "synthetic:<task>" (finding, modality, anatomy, laterality): `synthetic_medical_dataset`;
      `n` defaults to 1000.
    - an existing directory: a `save_to_disk` folder -> `load_hub_dataset`; a folder holding `.dcm` files ->
      `load_dicom_folder`; any other folder -> `load_image_folder`.
    - otherwise a Hub id ("name" or "owner/name") -> `load_hub_dataset`.

    `kwargs` go to the chosen loader.

    Raises:
        ValueError: `spec` is none of these (e.g. a path that does not exist).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec={spec!r} is not allowed: it must be a non-empty string.")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        task = spec.partition(":")[2] or kwargs.pop("task", "finding")
        return synthetic_medical_dataset(kwargs.pop("n", 1000), task=task, **kwargs)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return load_hub_dataset(spec, **kwargs)
        if _dicom_files(path, kwargs.get("recursive", True)):
            return load_dicom_folder(path, **kwargs)
        return load_image_folder(path, **kwargs)
    if path.exists():
        raise ValueError(f"spec={spec!r} is a file: pass the folder that holds it.")
    if _HUB_ID.fullmatch(spec) and ".." not in spec:
        return load_hub_dataset(spec, **kwargs)
    raise ValueError(
        f"spec={spec!r} is not 'synthetic[:task]', an existing directory, or a Hub id ('name' or 'owner/name'); "
        "if it is a local path, it does not exist."
    )
