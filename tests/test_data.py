"""The data layer: the synthetic benchmark, the real-data loaders (image folder, DICOM, saved/Hub datasets), the
word-level tokenizer and the collator. All offline."""

from __future__ import annotations

import logging
import re
import shutil
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ran_peft.data import (
    ANATOMIES,
    FINDINGS,
    LATERALITIES,
    MODALITIES,
    ImageTextCollator,
    UnreadableDicomError,
    class_prompts,
    load_dataset_any,
    load_dicom_folder,
    load_hub_dataset,
    load_image_folder,
    load_medmnist,
    standardize_columns,
    synthetic_medical_dataset,
    tokenize_class_prompts,
)
from ran_peft.text import build_word_tokenizer, split_words, synthetic_vocabulary

pydicom_data = pytest.importorskip("pydicom.data")


@pytest.fixture(scope="module")
def synthetic_600() -> datasets.Dataset:
    return synthetic_medical_dataset(600, seed=0, split_name="train")


def _image_bytes(dataset: datasets.Dataset) -> list[bytes]:
    return [row["bytes"] for row in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


# ---- synthetic benchmark ----------------------------------------------------------------------------------------


def test_synthetic_same_seed_same_bytes_other_seed_other_data():
    first = synthetic_medical_dataset(40, seed=7)
    again = synthetic_medical_dataset(40, seed=7)
    other = synthetic_medical_dataset(40, seed=8)
    assert _image_bytes(first) == _image_bytes(again)
    assert first["caption"] == again["caption"]
    assert first["caption"] != other["caption"]
    assert all(a != b for a, b in zip(_image_bytes(first), _image_bytes(other), strict=True))


def test_synthetic_prefix_is_stable_and_splits_differ(synthetic_600):
    short = synthetic_medical_dataset(300, seed=0, split_name="train")
    assert _image_bytes(short) == _image_bytes(synthetic_600.select(range(300)))
    test = synthetic_medical_dataset(300, seed=0, split_name="test")
    assert test["caption"] != short["caption"]
    assert test.split == "test"


def test_synthetic_columns_and_features(synthetic_600):
    row = synthetic_600[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    assert row["image"].size == (64, 64)
    assert synthetic_600.features["label"].names == list(FINDINGS)
    assert set(synthetic_600.column_names) == {
        "image",
        "caption",
        "label",
        "modality",
        "anatomy",
        "finding",
        "laterality",
        "size_mm",
    }
    assert "synthetic" in synthetic_600.info.description
    assert synthetic_medical_dataset(3, image_size=96)[0]["image"].size == (96, 96)


def test_synthetic_caption_states_its_metadata(synthetic_600):
    for row in synthetic_600.select(range(300)):
        caption = row["caption"].lower()
        assert row["modality"].lower() in caption
        assert row["anatomy"] in caption
        assert row["label"] == FINDINGS.index(row["finding"])
        assert row["finding"] in caption
        if row["finding"] == "normal":
            assert row["laterality"] == "none" and row["size_mm"] == 0
            assert not re.search(r"\b(left|right)\b", caption)
            assert "mm" not in caption
        else:
            assert re.search(rf"\b{row['laterality']}\b", caption)
            assert f" {row['size_mm']} mm" in caption
            assert row["size_mm"] > 0


def test_synthetic_lesion_is_drawn_on_the_stated_side():
    # Radiological convention: the patient's right is on the image's left. Nodules and masses are bright, so
    # they raise the mean of the image half they sit in.
    dataset = synthetic_medical_dataset(500, seed=1).filter(lambda row: row["finding"] in ("nodule", "mass"))
    grey = np.stack([np.asarray(image.convert("L"), dtype=np.float32) for image in dataset["image"]])
    half = grey.shape[-1] // 2
    left_minus_right = grey[:, :, :half].mean((1, 2)) - grey[:, :, half:].mean((1, 2))
    sides = np.array(dataset["laterality"])
    # Seen: medians +2.4 (right) and -0.9 (left) grey levels; the liver makes the baseline lopsided.
    assert np.median(left_minus_right[sides == "right"]) > np.median(left_minus_right[sides == "left"]) + 2.0


@pytest.mark.parametrize("task", ["finding", "modality", "anatomy", "laterality"])
def test_synthetic_task_labels_are_balanced(task):
    dataset = synthetic_medical_dataset(300, seed=2, task=task)
    names = dataset.features["label"].names
    assert names == list(
        {"finding": FINDINGS, "modality": MODALITIES, "anatomy": ANATOMIES, "laterality": LATERALITIES}[task]
    )
    counts = np.bincount(dataset["label"], minlength=len(names))
    assert counts.min() >= 0.8 * len(dataset) / len(names)
    assert [names[label] for label in dataset["label"]] == dataset[task]


def test_synthetic_is_learnable_but_not_trivial():
    # A linear probe on fixed, generic features: 8x8 average-pooled grey pixels and the signed and absolute
    # left-right mirror differences (lesions break the anatomy's symmetry); 600 training rows, 400 held out.
    # Seen: finding 0.32 (chance 0.20), laterality 0.48 (chance 0.33); training accuracy 0.54 and 0.63.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def features(dataset: datasets.Dataset) -> np.ndarray:
        grey = np.stack(
            [np.asarray(image.convert("L"), dtype=np.float32) / 255 for image in dataset["image"]]
        )
        count, size, _ = grey.shape
        mirror = grey - grey[:, :, ::-1]

        def pool(values: np.ndarray) -> np.ndarray:
            return values.reshape(count, 8, size // 8, 8, size // 8).mean((2, 4)).reshape(count, -1)

        return np.concatenate([pool(grey), pool(mirror), pool(np.abs(mirror))], axis=1)

    for task, chance in (("finding", 1 / 5), ("laterality", 1 / 3)):
        train = synthetic_medical_dataset(600, seed=0, task=task, split_name="train")
        test = synthetic_medical_dataset(400, seed=0, task=task, split_name="test")
        scaler = StandardScaler().fit(features(train))
        probe = LogisticRegression(max_iter=500, C=0.1).fit(scaler.transform(features(train)), train["label"])
        accuracy = probe.score(scaler.transform(features(test)), test["label"])
        assert chance + 0.07 < accuracy < 0.9, (task, accuracy)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n=0"),
        ({"n": -3}, "n=-3"),
        ({"n": 4, "task": "organ"}, "task='organ'"),
        ({"n": 4, "image_size": 8}, "image_size=8"),
        ({"n": 4, "seed": -1}, "seed=-1"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, field):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=re.escape(field)):
        synthetic_medical_dataset(n, **kwargs)


# ---- DICOM --------------------------------------------------------------------------------------------------------


def _copy_pydicom_files(tmp_path, names):
    folder = tmp_path / "dicom"
    (folder / "series").mkdir(parents=True)
    for name in names:
        path = pydicom_data.get_testdata_file(name)
        if path is None:
            pytest.skip(f"pydicom test file {name} is not installed")
        shutil.copy(path, folder / "series" / name)
    return folder


def test_dicom_folder_loads_pydicom_ct_and_mr(tmp_path):
    folder = _copy_pydicom_files(tmp_path, ["CT_small.dcm", "MR_small.dcm"])
    dataset = load_dicom_folder(folder)
    assert dataset.column_names == ["image", "caption", "modality", "body_part", "source_path"]
    rows = {row["source_path"]: row for row in dataset}
    assert set(rows) == {"series/CT_small.dcm", "series/MR_small.dcm"}  # relative, never the user's path
    ct, mr = rows["series/CT_small.dcm"], rows["series/MR_small.dcm"]
    assert ct["modality"] == "CT" and ct["caption"].startswith("CT image (axial, feet first, supine)")
    assert mr["modality"] == "MRI" and mr["caption"].startswith("MRI image (axial, head first, supine)")
    for row in (ct, mr):
        pixels = np.asarray(row["image"])
        assert row["image"].mode == "RGB" and pixels.dtype == np.uint8
        assert pixels.max() - pixels.min() > 150  # windowed into the 8-bit range, not clipped flat
    assert ct["image"].size == (128, 128) and mr["image"].size == (64, 64)
    assert str(tmp_path) not in "".join(list(dataset["source_path"]) + list(dataset["caption"]))


def test_dicom_garbage_file_names_the_file(tmp_path):
    folder = _copy_pydicom_files(tmp_path, ["MR_small.dcm"])
    (folder / "broken.dcm").write_bytes(b"this is not a DICOM file" * 10)
    with pytest.raises(UnreadableDicomError, match=r"broken\.dcm.*not a valid DICOM"):
        load_dicom_folder(folder)


def test_dicom_truncated_file_names_the_file(tmp_path):
    folder = _copy_pydicom_files(tmp_path, [])
    with open(pydicom_data.get_testdata_file("CT_small.dcm"), "rb") as file:
        data = file.read()
    (folder / "cut.dcm").write_bytes(data[: len(data) - 5000])
    with pytest.raises(ValueError, match=r"cut\.dcm"):
        load_dicom_folder(folder)


def test_dicom_skip_unreadable_logs_and_counts(tmp_path, caplog):
    folder = _copy_pydicom_files(tmp_path, ["CT_small.dcm"])
    (folder / "broken.dcm").write_bytes(b"\x00" * 300)
    with caplog.at_level(logging.WARNING, logger="ran_peft.data"):
        dataset = load_dicom_folder(folder, skip_unreadable=True)
    assert dataset["source_path"] == ["series/CT_small.dcm"]
    assert "Skipped 1 of 2" in caplog.text and "broken.dcm" in caplog.text
    assert "skipped 1 unreadable files: broken.dcm" in dataset.info.description


def test_dicom_folder_without_dicom_files_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no DICOM files"):
        load_dicom_folder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_dicom_folder(tmp_path / "missing")


# ---- image folder, saved datasets, dispatch ---------------------------------------------------------------------


def _write_image_folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for name in ("benign", "malignant_tumor"):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def test_image_folder_labels_from_folders_and_captions_from_class_names(tmp_path):
    root = _write_image_folder(tmp_path / "images")
    dataset = load_image_folder(root, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 6
    assert dataset.features["label"].names == ["benign", "malignant_tumor"]
    assert sorted(set(dataset["caption"])) == ["An image of benign.", "An image of malignant tumor."]
    assert dataset[0]["image"].size == (24, 20)


def test_image_folder_captions_from_metadata(tmp_path):
    root = _write_image_folder(tmp_path / "images", per_class=2)
    lines = ["file_name,report"] + [
        f"{name}/{i}.png,report {name} {i}" for name in ("benign", "malignant_tumor") for i in range(2)
    ]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    dataset = load_image_folder(root, captions="report", cache_dir=str(tmp_path / "cache"))
    assert sorted(dataset["caption"])[0] == "report benign 0"
    assert dataset.features["label"].names == ["benign", "malignant_tumor"]
    assert all(
        ("malignant" in caption) == (label == 1)
        for caption, label in zip(dataset["caption"], dataset["label"], strict=True)
    )
    with pytest.raises(ValueError, match=r"captions='findings'.*available columns"):
        load_image_folder(root, captions="findings", cache_dir=str(tmp_path / "cache"))


def test_standardize_columns_renames_and_names_missing_columns():
    raw = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (4, 4))] * 2, "report": ["a", "b"], "y": [0, 1]},
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "report": datasets.Value("string"),
                "y": datasets.ClassLabel(names=["no", "yes"]),
            }
        ),
    )
    dataset = standardize_columns(raw, image_column="img", caption_column="report", label_column="y")
    assert dataset.column_names == ["image", "caption", "label"]
    captions = standardize_columns(raw, image_column="img", label_column="y")["caption"]
    assert captions == ["An image of no.", "An image of yes."]
    with pytest.raises(
        ValueError, match=r"caption_column='text'.*available columns: \['img', 'report', 'y'\]"
    ):
        standardize_columns(raw, image_column="img", caption_column="text")


def test_hub_loader_on_a_saved_dataset_names_the_missing_column(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(
        {"picture": [Image.new("RGB", (4, 4))], "text": ["a chest x-ray"]},
        features=datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(str(saved))
    with pytest.raises(ValueError, match=r"image_column='image'.*available columns: \['picture', 'text'\]"):
        load_hub_dataset(str(saved))
    dataset = load_hub_dataset(str(saved), image_column="picture", caption_column="text")
    assert dataset[0]["caption"] == "a chest x-ray"
    assert load_dataset_any(str(saved), image_column="picture", caption_column="text").column_names == [
        "image",
        "caption",
    ]


def test_load_dataset_any_dispatches(tmp_path):
    assert load_dataset_any("synthetic:anatomy", n=5).features["label"].names == list(ANATOMIES)
    assert load_dataset_any("synthetic", n=5).features["label"].names == list(FINDINGS)
    dicom = _copy_pydicom_files(tmp_path, ["MR_small.dcm"])
    assert load_dataset_any(str(dicom))["modality"] == ["MRI"]
    images = _write_image_folder(tmp_path / "images", per_class=1)
    assert len(load_dataset_any(str(images), cache_dir=str(tmp_path / "cache"))) == 2
    for bad in (str(tmp_path / "missing" / "deeper"), "./no/such/folder", "/definitely/not/here"):
        with pytest.raises(ValueError, match="not 'synthetic"):
            load_dataset_any(bad)
    with pytest.raises(ValueError, match="task='colour'"):
        load_dataset_any("synthetic:colour", n=3)


def test_medmnist_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # makes `import medmnist` fail
    with pytest.raises(ImportError, match=r"pip install medmnist.*network"):
        load_medmnist("pathmnist")


# ---- tokenizer ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_tokenizer():
    return build_word_tokenizer(synthetic_vocabulary(), max_length=32)


def test_tokenizer_covers_every_synthetic_caption(synthetic_tokenizer, synthetic_600):
    for task in ("finding", "laterality"):
        source = synthetic_600 if task == "finding" else synthetic_medical_dataset(200, task=task)
        ids = synthetic_tokenizer(list(source["caption"]))["input_ids"]
        assert all(synthetic_tokenizer.unk_token_id not in row for row in ids)
    assert synthetic_tokenizer("zebra")["input_ids"][1] == synthetic_tokenizer.unk_token_id


def test_tokenizer_round_trip_and_special_tokens(tmp_path, synthetic_tokenizer):
    tokenizer = synthetic_tokenizer
    assert (
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    ) == (0, 1, 2, 3)
    text = "Axial CT of the chest shows a 12 mm nodule in the right lower lobe."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == split_words(text)
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.model_max_length == 32 and reloaded.padding_side == "right"


def test_tokenizer_keeps_eos_last_when_truncating_and_padding():
    tokenizer = build_word_tokenizer(["one two three four five six seven"], max_length=5, vocab_size=9)
    assert len(tokenizer) == 9
    batch = tokenizer(
        ["one two three four five six seven", "two"], padding=True, truncation=True, return_tensors="pt"
    )
    assert batch["input_ids"].shape == (2, 5)
    lengths = batch["attention_mask"].sum(1)
    for row, length in zip(batch["input_ids"], lengths, strict=True):
        assert row[length - 1] == tokenizer.eos_token_id
        assert (row[length:] == tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="vocab_size=4"):
        build_word_tokenizer(["a b"], vocab_size=4)
    with pytest.raises(ValueError, match="single str"):
        build_word_tokenizer("a b")


def test_clip_text_model_pools_at_the_tokenizer_eos(synthetic_tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = synthetic_tokenizer
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=32,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config).eval()
    batch = tokenizer(["CT of the chest is normal.", "MRI of the brain."], padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**batch)
    eos_position = batch["attention_mask"].sum(1) - 1
    expected = output.last_hidden_state[torch.arange(2), eos_position]
    torch.testing.assert_close(output.pooler_output, expected)


# ---- collation ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_processor():
    from tiny_models import processor

    return processor()


def test_collator_classification_and_contrastive_shapes(synthetic_600, image_processor, synthetic_tokenizer):
    rows = [synthetic_600[i] for i in range(4)]
    batch = ImageTextCollator(image_processor)(rows)
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["labels"].tolist() == [row["label"] for row in rows]
    collate = ImageTextCollator(image_processor, synthetic_tokenizer, mode="contrastive", max_length=12)
    batch = collate(rows)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 12
    loader = torch.utils.data.DataLoader(synthetic_600.select(range(8)), batch_size=4, collate_fn=collate)
    assert next(iter(loader))["pixel_values"].shape == (4, 3, 16, 16)


def test_collator_errors_name_the_problem(image_processor):
    with pytest.raises(ValueError, match="mode='contrastive' needs a tokenizer"):
        ImageTextCollator(image_processor, mode="contrastive")
    with pytest.raises(ValueError, match="mode='retrieval'"):
        ImageTextCollator(image_processor, mode="retrieval")
    with pytest.raises(ValueError, match=r"row 1 has no 'label'"):
        ImageTextCollator(image_processor)(
            [{"image": Image.new("RGB", (8, 8)), "label": 0}, {"image": Image.new("RGB", (8, 8))}]
        )


def test_class_prompts_and_their_tokens(synthetic_tokenizer):
    prompts = class_prompts(["pleural_effusion", "normal"])
    assert prompts == ["A medical image showing pleural effusion.", "A medical image showing normal."]
    tokens = tokenize_class_prompts(synthetic_tokenizer, FINDINGS, template="{} on CT of the chest.")
    assert tokens["input_ids"].shape[0] == len(FINDINGS)
    assert tokens["input_ids"].shape == tokens["attention_mask"].shape
    with pytest.raises(ValueError, match="template="):
        class_prompts(["a"], template="no slot")
