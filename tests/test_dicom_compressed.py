"""DICOM folders as hospitals export them: compressed transfer syntaxes decode out of the box (the pylibjpeg
plugins are dependencies), and a folder with unreadable files says which and how many."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ran_peft.data import UnreadableDicomError, load_dicom_folder

data_store = pytest.importorskip(
    "data_store", reason="pydicom-data (real DICOM files) is not installed: pip install 'ran-peft[test]'"
)
PYDICOM_DATA = Path(data_store.__file__).parent / "data"
# The one file of pydicom-data 1.0.0 that holds no complete image: its JPEG 2000 pixel data is deliberately cut.
CUT_SHORT = "emri_small_jpeg_2k_lossless_too_short.dcm"
JPEG_LOSSLESS, JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS, JPEG_2000, JPEG_BASELINE, RLE = (
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.5",
)
# Losslessly compressed files and their uncompressed twins in pydicom-data: the decoded images must be identical.
LOSSLESS_TWINS = {
    "MR2_J2KR.dcm": "MR2_UNCR.dcm",
    "RG1_J2KR.dcm": "RG1_UNCR.dcm",
    "US1_J2KR.dcm": "US1_UNCR.dcm",
    "emri_small_jpeg_2k_lossless.dcm": "emri_small.dcm",
    "emri_small_jpeg_ls_lossless.dcm": "emri_small.dcm",
    "emri_small_RLE.dcm": "emri_small.dcm",
}


def _transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


@pytest.mark.slow
def test_every_pydicom_data_file_with_an_image_loads_compressed_ones_included():
    files = sorted(p.name for p in PYDICOM_DATA.glob("*.dcm"))
    assert len(files) >= 60 and CUT_SHORT in files
    dataset = load_dicom_folder(PYDICOM_DATA, skip_unreadable=True)
    loaded = list(dataset["source_path"])
    assert sorted(loaded) == [name for name in files if name != CUT_SHORT]
    assert f"skipped 1 unreadable files: {CUT_SHORT}" in dataset.info.description

    # OT-PAL-8-face.dcm has no 'DICM' header (a plain read refuses it) but is an image: it loads, with no syntax here.
    syntaxes = {_transfer_syntax(PYDICOM_DATA / name) for name in loaded if name != "OT-PAL-8-face.dcm"}
    for syntax in (JPEG_LOSSLESS, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_2000, JPEG_BASELINE, RLE):
        assert syntax in syntaxes, syntax

    images = dict(zip(loaded, dataset["image"], strict=True))
    for compressed, plain in LOSSLESS_TWINS.items():
        assert np.array_equal(np.asarray(images[compressed]), np.asarray(images[plain])), compressed
    assert np.asarray(images["JPEG-LL.dcm"]).std() > 10  # decoded, not a flat frame


def test_folder_with_unreadable_files_names_them_counts_them_and_points_to_skip_unreadable(tmp_path):
    for name in ("JPEG-LL.dcm", "emri_small_jpeg_ls_lossless.dcm", CUT_SHORT):
        shutil.copy(PYDICOM_DATA / name, tmp_path / name)
    (tmp_path / "notes.dcm").write_bytes(b"this is not a DICOM file" * 10)
    with pytest.raises(UnreadableDicomError) as error:
        load_dicom_folder(tmp_path)
    message = str(error.value)
    assert "2 of 4 DICOM files cannot be read as images (2 can)" in message
    assert CUT_SHORT in message and "notes.dcm" in message and "not a valid DICOM" in message
    assert "JPEG-LL.dcm" not in message
    assert "skip_unreadable=True" in message

    dataset = load_dicom_folder(tmp_path, skip_unreadable=True)
    assert sorted(dataset["source_path"]) == ["JPEG-LL.dcm", "emri_small_jpeg_ls_lossless.dcm"]


def test_many_unreadable_files_are_counted_and_the_first_ten_named(tmp_path):
    shutil.copy(PYDICOM_DATA / "JPEG-LL.dcm", tmp_path / "good.dcm")
    for index in range(12):
        (tmp_path / f"bad{index:02d}.dcm").write_bytes(b"\x00" * 64)
    with pytest.raises(UnreadableDicomError, match=r"12 of 13 DICOM files") as error:
        load_dicom_folder(tmp_path)
    message = str(error.value)
    assert "bad09.dcm" in message and "bad10.dcm" not in message and "... and 2 more" in message


def test_file_without_dicm_header_but_with_a_palette_image_loads_in_colour(tmp_path):
    shutil.copy(PYDICOM_DATA / "OT-PAL-8-face.dcm", tmp_path / "face.dcm")
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(tmp_path / "face.dcm")  # what a plain read says
    image = load_dicom_folder(tmp_path)[0]["image"]
    pixels = np.asarray(image).astype(int)
    assert image.mode == "RGB" and pixels.std() > 10
    assert np.abs(pixels[..., 0] - pixels[..., 2]).mean() > 5  # the palette's colours, not grey indices
