"""Noisy upstream data: exact noise ratio, untouched clean rows, the caption and image attacks, input errors."""

from __future__ import annotations

import random
import re
import zlib

import datasets
import numpy as np
import PIL.Image
import pytest
import tiny_models as tm
import torch

from ran_peft.noise import (
    MEDICAL_TERM_GROUPS,
    NEGATION_SWAPS,
    SurrogateVLM,
    add_adversarial_noise,
    noisy_rows,
    substitute_medical_terms,
)

CAPTIONS = [
    "Axial CT of the chest shows a 12 mm nodule in the left upper lobe.",
    "No pleural effusion. The right lung is clear.",
    "MRI of the brain shows no hemorrhage.",
    "Ultrasound of the liver: small cyst, 1.5 cm.",
    "X-ray of the left knee shows a fracture.",
    "There is no mass in the right kidney.",
    "Findings consistent with moderate edema in the abdomen.",
    "PET of the pelvis without a lesion.",
]
NUM_ROWS = 20
ODD_ROW = 3  # a grey 24x20 image among 16x16 RGB ones: attacked at its own size and mode


def _image(row: int) -> PIL.Image.Image:
    rng = np.random.default_rng(row)
    if row == ODD_ROW:
        return PIL.Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8), mode="L")
    return PIL.Image.fromarray(
        rng.integers(0, 256, (tm.IMAGE_SIZE, tm.IMAGE_SIZE, 3), dtype=np.uint8), mode="RGB"
    )


def _dataset(num_rows: int = NUM_ROWS) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "image": [_image(row) for row in range(num_rows)],
            "caption": [CAPTIONS[row % len(CAPTIONS)] for row in range(num_rows)],
            "label": [row % 3 for row in range(num_rows)],
        }
    )


def _tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
    """Words hashed into the tiny CLIP's 64-token vocabulary, between bos (1) and eos (2), padded with 0."""
    rows = [[1] + [3 + zlib.crc32(w.lower().encode()) % 61 for w in c.split()][:14] + [2] for c in captions]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def _bytes(dataset: datasets.Dataset, row: int) -> bytes:
    return dataset.cast_column("image", datasets.Image(decode=False))[row]["image"]["bytes"]


@pytest.fixture(scope="module")
def surrogate() -> SurrogateVLM:
    return SurrogateVLM(tm.clip().model, tm.processor(), _tokenize)


@pytest.fixture(scope="module")
def clean() -> datasets.Dataset:
    return _dataset()


@pytest.fixture(scope="module")
def image_noised(clean, surrogate) -> datasets.Dataset:
    return add_adversarial_noise(
        clean, 0.5, mode="both", seed=3, surrogate=surrogate, epsilon=16 / 255, steps=6, batch_size=4
    )


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.25, 0.5, 0.73, 1.0])
def test_noisy_fraction_is_exact(clean, ratio):
    noised = add_adversarial_noise(clean, ratio, mode="caption", seed=1)
    expected = round(ratio * NUM_ROWS)
    assert sum(noised["noisy"]) == expected
    assert [row for row, flag in enumerate(noised["noisy"]) if flag] == noisy_rows(NUM_ROWS, ratio, seed=1)
    assert sum(kind != "none" for kind in noised["noise_kind"]) == expected
    assert sum(a != b for a, b in zip(noised["caption"], noised["original_caption"], strict=True)) == expected


def test_chosen_rows_follow_the_seed_and_nest_across_ratios(clean):
    def rows(seed: int, ratio: float = 0.3) -> list[int]:
        noised = add_adversarial_noise(clean, ratio, mode="caption", seed=seed)
        return [row for row, flag in enumerate(noised["noisy"]) if flag]

    assert rows(seed=0) == rows(seed=0)
    assert rows(seed=0) != rows(seed=1)
    assert set(rows(seed=5, ratio=0.2)) < set(rows(seed=5, ratio=0.6))


def test_rows_without_noise_are_unchanged_byte_for_byte(clean, image_noised):
    for row in range(NUM_ROWS):
        if not image_noised[row]["noisy"]:
            assert image_noised[row]["noise_kind"] == "none" and image_noised[row]["noise_detail"] == ""
            assert _bytes(image_noised, row) == _bytes(clean, row)
            assert image_noised[row]["caption"] == clean[row]["caption"]
            assert image_noised[row]["noise_target_row"] == -1
        else:
            assert image_noised[row]["noise_kind"] == "both"
            assert _bytes(image_noised, row) != _bytes(clean, row)
    assert image_noised["label"] == clean["label"]
    assert image_noised["original_caption"] == clean["caption"]


def _terms(caption: str) -> list[str]:
    """The known terms, negation words and sizes of a caption, in order (what an attack must change)."""
    known = {t.lower() for group in MEDICAL_TERM_GROUPS.values() for t in group}
    known |= {w for phrase in NEGATION_SWAPS for w in phrase.split()} - {
        "a",
        "an",
        "is",
        "there",
        "of",
        "shows",
    }
    words = re.findall(r"[\w.-]+", caption.lower())
    return [w.rstrip(".") for w in words if w.rstrip(".") in known or re.fullmatch(r"[\d.]+(mm|cm)?", w)]


def test_caption_attack_changes_a_medical_term_in_every_attacked_caption(clean):
    noised = add_adversarial_noise(clean, 0.6, mode="caption", seed=2)
    for row in noised:
        if row["noisy"]:
            assert row["noise_kind"] == "caption"
            assert _terms(row["caption"]) != _terms(row["original_caption"]), row
            assert row["noise_detail"].startswith("caption: ") and "->" in row["noise_detail"]
        else:
            assert row["caption"] == row["original_caption"]
    assert noised["image"][0].tobytes() == clean["image"][0].tobytes()


def test_caption_attack_is_deterministic_by_seed_and_independent_of_batch_size(clean):
    first = add_adversarial_noise(clean, 1.0, mode="caption", seed=4, batch_size=3)["caption"]
    again = add_adversarial_noise(clean, 1.0, mode="caption", seed=4, batch_size=16)["caption"]
    other = add_adversarial_noise(clean, 1.0, mode="caption", seed=5)["caption"]
    assert first == again
    assert first != other


_ORGANS = "|".join(MEDICAL_TERM_GROUPS["organ"])
_DIFFUSE = "|".join(MEDICAL_TERM_GROUPS["diffuse_finding"])
_DIFFUSE_TITLE = "|".join(term.capitalize() for term in MEDICAL_TERM_GROUPS["diffuse_finding"])


@pytest.mark.parametrize(
    ("caption", "pattern"),
    [
        ("The left kidney.", rf"The (left|right) ({_ORGANS})\."),
        ("LEFT", "RIGHT"),
        ("Left", "Right"),
        ("left", "right"),
        ("Upper LEFT lobe.", r"(Upper|Lower) (LEFT|RIGHT) lobe\."),
        ("Image shows no abnormality.", r"Image shows an abnormality\."),
        ("No edema.", rf"({_DIFFUSE_TITLE})\.|No ({_DIFFUSE})\."),
        ("CT shows a mass.", r"(CT|MRI|X-ray|Ultrasound|PET) shows (a|no|an) (\w+)\."),
    ],
)
def test_substitution_preserves_case(caption, pattern):
    for seed in range(30):
        result = substitute_medical_terms(caption, random.Random(seed))
        assert result != caption and re.fullmatch(pattern, result), result


def test_substitution_matches_whole_words_only():
    caption = "Leftover contrast near the kidneys, no masses; the liverish nodularity is noted."
    for seed in range(30):
        result = substitute_medical_terms(caption, random.Random(seed))
        assert result.startswith("Leftover contrast")
        assert "liverish nodularity" in result
        assert result != caption


def test_substitution_changes_sizes_and_falls_back_to_negation():
    for seed in range(10):
        result = substitute_medical_terms("A 12 mm opacity.", random.Random(seed))
        assert result != "A 12 mm opacity." and re.fullmatch(r"An? \d+(\.\d+)? (mm|cm) opacity\.", result), (
            result
        )
    assert substitute_medical_terms("Unremarkable study.", random.Random(0)) == "No unremarkable study."


def test_rewriter_hook_is_used_and_recorded(clean):
    def rewriter(caption: str, rng: random.Random) -> str:
        return caption.replace(".", "", 1) + " (rewritten)."

    noised = add_adversarial_noise(clean, 0.5, mode="caption", rewriter=rewriter)
    for row in noised:
        if row["noisy"]:
            assert row["caption"].endswith("(rewritten).")
            assert row["noise_detail"].startswith("caption: rewriter: ")
    with pytest.raises(ValueError, match="rewriter returned"):
        add_adversarial_noise(clean, 0.5, mode="caption", rewriter=lambda caption, rng: caption)


def test_image_attack_stays_within_epsilon_in_8_bit_levels(clean, image_noised):
    budget = 16  # floor(16/255 * 255)
    attacked = [row for row in range(NUM_ROWS) if image_noised[row]["noisy"]]
    assert ODD_ROW in attacked
    for row in attacked:
        before, after = clean[row]["image"], image_noised[row]["image"]
        assert after.size == before.size and after.mode == before.mode
        difference = np.asarray(after, dtype=np.int16) - np.asarray(before, dtype=np.int16)
        assert np.abs(difference).max() <= budget
        assert np.abs(difference).max() >= budget - 1  # the budget is used, not wasted
        target = image_noised[row]["noise_target_row"]
        assert target != row and clean[target]["caption"] != clean[row]["caption"]
        assert f"target_row={target}" in image_noised[row]["noise_detail"]


def test_image_attack_raises_similarity_to_the_target_caption(clean, image_noised, surrogate):
    attacked = [row for row in range(NUM_ROWS) if image_noised[row]["noisy"]]
    targets = [clean[image_noised[row]["noise_target_row"]]["caption"] for row in attacked]
    before = surrogate.similarity([clean[row]["image"] for row in attacked], targets)
    after = surrogate.similarity([image_noised[row]["image"] for row in attacked], targets)
    assert after.mean() > before.mean() + 0.05, (before, after)
    assert (after > before).float().mean() >= 0.8


def test_surrogate_accepts_plain_tensor_features(surrogate):
    class TensorFeatures(torch.nn.Module):
        """A transformers-4-style model: the feature methods return tensors."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_image_features(self, **kwargs):
            return self.inner.get_image_features(**kwargs).pooler_output

        def get_text_features(self, **kwargs):
            return self.inner.get_text_features(**kwargs).pooler_output

    plain = SurrogateVLM(TensorFeatures(surrogate.model), tm.processor(), _tokenize)
    pixels = torch.rand(2, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(plain.image_embeddings(pixels), surrogate.image_embeddings(pixels))
    torch.testing.assert_close(plain.text_embeddings(CAPTIONS[:2]), surrogate.text_embeddings(CAPTIONS[:2]))


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "0.5", None, True, float("nan")])
def test_bad_ratio_is_rejected(clean, ratio):
    with pytest.raises(ValueError, match=r"`ratio` must be a number in \[0, 1\], got"):
        add_adversarial_noise(clean, ratio, mode="caption")


def test_bad_inputs_are_rejected(clean, surrogate):
    with pytest.raises(ValueError, match=r"'report'.*available columns: \['image', 'caption', 'label'\]"):
        add_adversarial_noise(clean, 0.5, mode="caption", caption_column="report")
    with pytest.raises(ValueError, match=r"'scan'.*image_column.*available columns"):
        add_adversarial_noise(clean, 0.5, mode="image", image_column="scan", surrogate=surrogate)
    with pytest.raises(ValueError, match="needs a `surrogate`"):
        add_adversarial_noise(clean, 0.5, mode="image")
    with pytest.raises(ValueError, match=r"`epsilon` must be a number in \[0, 1\], got 2"):
        add_adversarial_noise(clean, 0.5, mode="image", surrogate=surrogate, epsilon=2)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        add_adversarial_noise(clean, 0.5, mode="text")
    with pytest.raises(ValueError, match="already has the noise column"):
        add_adversarial_noise(add_adversarial_noise(clean, 0.5, mode="caption"), 0.5, mode="caption")


def test_result_round_trips_through_save_to_disk(image_noised, tmp_path):
    image_noised.save_to_disk(str(tmp_path / "noisy"))
    loaded = datasets.load_from_disk(str(tmp_path / "noisy"))
    assert loaded.features == image_noised.features
    for column in (
        "caption",
        "noisy",
        "noise_kind",
        "noise_detail",
        "noise_target_row",
        "original_caption",
        "label",
    ):
        assert loaded[column] == image_noised[column]
    assert all(_bytes(loaded, row) == _bytes(image_noised, row) for row in range(NUM_ROWS))
