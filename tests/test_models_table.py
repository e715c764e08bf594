"""The models table is generated from the sweep's outcomes: a row edited by hand fails the check, and a family the
sweep did not try never shows as supported."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_models_table", ROOT / "docs" / "gen_models_table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

OUTCOMES = {
    "transformers": "9.9.9",
    "torch": "0.0.0",
    "mappings": ["image-text-to-text", "image-classification"],
    "registry": [
        ["image-text-to-text", "alpha_vl", "AlphaVLForConditionalGeneration"],
        ["image-text-to-text", "beta_vl", "BetaVLForConditionalGeneration"],
        ["image-text-to-text", "gamma_vl", "GammaVLForConditionalGeneration"],
        ["image-classification", "delta", "DeltaForImageClassification"],
    ],
    "families": [
        {"mapping": "image-text-to-text", "model_type": "alpha_vl", "head_class": "AlphaVLForConditionalGeneration",
         "outcome": table.TRAINED, "image_processor": "AlphaImageProcessorPil", "pixel_layout": "patch_rows",
         "padding_elements": 0},
        {"mapping": "image-text-to-text", "model_type": "beta_vl", "head_class": "BetaVLForConditionalGeneration",
         "outcome": table.NAMED_ERROR, "image_processor": "BetaImageProcessorPil", "error": "PixelLayoutError",
         "detail": "RAN cannot place the pixels of this batch: state pixel_layout=... . More."},
        {"mapping": "image-classification", "model_type": "delta", "head_class": "DeltaForImageClassification",
         "outcome": table.NOT_BUILDABLE, "reason": "torchvision only", "detail": "only DeltaImageProcessor"},
    ],
}  # fmt: skip


@pytest.fixture
def written(tmp_path):
    outcomes = tmp_path / "outcomes.json"
    outcomes.write_text(json.dumps(OUTCOMES))
    page, readme = tmp_path / "models.md", tmp_path / "README.md"
    readme.write_text(f"# Project\n\n{table.START}\nold table\n{table.END}\n\nMore text.\n")
    assert table.main([str(outcomes), "--page", str(page), "--readme", str(readme)]) == 0
    return outcomes, page, readme


def _check(outcomes, page, readme) -> int:
    return table.main([str(outcomes), "--check", "--page", str(page), "--readme", str(readme)])


def test_the_generated_files_pass_the_check_and_keep_the_readme_around_the_markers(written, capsys):
    outcomes, page, readme = written
    assert _check(outcomes, page, readme) == 0
    text = readme.read_text()
    assert text.startswith("# Project\n\n") and text.endswith("\n\nMore text.\n") and "old table" not in text
    assert "| image-text-to-text | 3 | 1 | 1 | 0 (none) | 1 |" in text


def test_a_row_edited_by_hand_fails_the_check_naming_the_row(written, capsys):
    outcomes, page, readme = written
    original = page.read_text()
    edited = original.replace(
        "| image-classification | delta | `DeltaForImageClassification` |  |  | not buildable here: torchvision only "
        "(only DeltaImageProcessor) |",
        "| image-classification | delta | `DeltaForImageClassification` |  | channels_first | trained, exact budget |",
    )
    assert edited != original
    page.write_text(edited)
    capsys.readouterr()
    assert _check(outcomes, page, readme) == 1
    report = capsys.readouterr().out
    assert "docs/models.md row image-classification / delta" in report
    assert "committed: | image-classification | delta |" in report and "trained, exact budget" in report
    assert "alpha_vl" not in report  # only the edited row is named


def test_a_readme_table_edited_by_hand_fails_the_check(written, capsys):
    outcomes, page, readme = written
    readme.write_text(readme.read_text().replace("beta_vl", "beta_vl, delta"))
    assert _check(outcomes, page, readme) == 1
    assert "README.md" in capsys.readouterr().out


def test_a_family_the_sweep_did_not_try_never_shows_as_supported(written):
    _, page, readme = written
    row = next(line for line in page.read_text().splitlines() if "| gamma_vl |" in line)
    assert row.endswith("| not tried |")
    trained = next(
        line for line in readme.read_text().splitlines() if "image-text-to-text**, trained" in line
    )
    assert "alpha_vl" in trained and "gamma_vl" not in trained


def test_a_failed_outcome_is_never_written(tmp_path):
    failed = json.loads(json.dumps(OUTCOMES))
    failed["families"][0]["outcome"] = "failed"
    outcomes = tmp_path / "outcomes.json"
    outcomes.write_text(json.dumps(failed))
    readme = tmp_path / "README.md"
    readme.write_text(f"{table.START}\n{table.END}\n")
    with pytest.raises(SystemExit, match="alpha_vl has outcome 'failed'"):
        table.main([str(outcomes), "--page", str(tmp_path / "models.md"), "--readme", str(readme)])
    assert not (tmp_path / "models.md").exists()
