"""AutoAttack evaluation: budgets in pixel units, per-sample worst case, and the gradient-masking checks."""

import warnings

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from ran_peft import PixelBox
from ran_peft.autoattack import (
    AutoAttackSettings,
    PixelSpaceClassifier,
    _autoattack_steps,
    autoattack_cascade,
    evaluate_autoattack,
)
from ran_peft.evaluation import GradientMaskingWarning
from ran_peft.families import detect_family

BOX = PixelBox((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))  # not the identity: a budget in the wrong units shows
TINY = AutoAttackSettings("test", apgd_steps=10, targets=2, fab_steps=10, square_queries=60)
CLASSES = 5


class LinearClassifier(nn.Module):
    """A Hugging Face-style image classifier (pixel_values, labels -> logits, loss), linear in its input."""

    def __init__(self, mask_gradient: bool = False, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(CLASSES, 3 * 6 * 6, generator=generator) * 0.3)
        self.mask_gradient = mask_gradient

    def forward(self, pixel_values=None, labels=None):
        x = pixel_values.flatten(1)
        if (
            self.mask_gradient
        ):  # the same function, with a zero input gradient: gradient masking in its purest form
            x = x.detach() + 0 * x
        logits = x @ self.weight.T
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def _batch(model, rows=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(rows, 3, 6, 6, generator=generator)
    pixel_values = BOX.from_pixels(pixels)
    with torch.no_grad():
        labels = model(pixel_values=pixel_values).logits.argmax(-1)  # clean accuracy 1
    return {"pixel_values": pixel_values, "labels": labels}


def test_every_attack_spends_exactly_the_budget_in_pixel_units():
    model = LinearClassifier().eval()
    batch = _batch(model)
    classifier = PixelSpaceClassifier(model, detect_family(model), BOX, torch.float32)
    pixels = classifier.to_pixels(batch["pixel_values"])
    epsilon = 2 / 255
    attacks = _autoattack_steps(TINY, epsilon, CLASSES, seed=0)
    assert [name for name, _ in attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    start = torch.ones(len(pixels), dtype=torch.bool)
    for name, make in attacks:
        _, counts = autoattack_cascade(classifier, pixels, batch["labels"], start, epsilon, [(name, make)])
        largest = counts[name]["max_perturbation"]
        assert largest <= epsilon + 1e-6, (name, largest)
        if name != "fab-t":  # FAB looks for the smallest perturbation; the others use the whole ball
            assert largest == pytest.approx(epsilon, abs=1e-5), (name, largest)


def test_worst_case_is_per_sample_and_out_of_budget_examples_do_not_count():
    epsilon = 0.04

    class Threshold(nn.Module):
        """Class 0 while pixel [0, 0, 0] < 0.5, else class 1; pixel [0, 0, 1] holds the row's id / 100."""

        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, pixels):
            switch = pixels[:, 0, 0, 0]
            return torch.stack([0.5 - switch, torch.zeros_like(switch)], dim=1) + self.dummy

    def pushes(ids, amount):
        def make(_classifier):
            def attack(pixels, labels):
                out = pixels.clone()
                chosen = torch.isin((pixels[:, 0, 0, 1] * 100).round().long(), torch.tensor(ids))
                out[chosen, 0, 0, 0] += amount
                return out

            return attack

        return make

    pixels = torch.full((4, 3, 2, 2), 0.48)
    pixels[3, 0, 0, 0] = 0.40  # row 3 is robust: no perturbation within the budget reaches 0.5
    pixels[:, 0, 0, 1] = torch.arange(4) / 100
    labels = torch.zeros(4, dtype=torch.long)
    attacks = [
        ("a", pushes([0, 1], epsilon)),
        ("b", pushes([0, 2], epsilon)),
        ("too far", pushes([3], 0.3)),  # fools row 3 only outside the budget
    ]
    robust, counts = autoattack_cascade(
        Threshold(), pixels, labels, torch.ones(4, dtype=torch.bool), epsilon, attacks
    )
    # each attack alone leaves 2 of 4 right (or 4 of 4): only the per-sample worst case gives 1 of 4
    assert robust.tolist() == [False, False, False, True]
    assert [counts[name]["fooled"] for name in ("a", "b", "too far")] == [2, 1, 0]
    assert counts["too far"]["max_perturbation"] == pytest.approx(0.3)


def test_gradient_masked_model_is_caught_by_the_black_box_check():
    def run(mask_gradient):
        model = LinearClassifier(mask_gradient=mask_gradient).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = evaluate_autoattack(
                model, [_batch(model)], pixel_box=BOX, epsilons=(8 / 255,), version=TINY, seed=0
            )
        return report, [w for w in caught if issubclass(w.category, GradientMaskingWarning)]

    honest, honest_warnings = run(False)
    masked, masked_warnings = run(True)
    # the same function: an honest attack gives both the same robust accuracy, the masked one lets it look robust
    assert honest.checks["black_box_not_stronger"]["passed"] is True
    assert honest.checks["large_budget_near_zero"]["passed"] is True
    assert not honest_warnings
    assert masked.checks["black_box_not_stronger"]["passed"] is False
    assert masked.checks["large_budget_near_zero"]["passed"] is False
    assert not masked.passed_checks and masked_warnings
    assert masked.attack["per_attack"]["8/255"]["square"]["fooled"] > 0


def test_report_names_the_attack_and_orders_accuracies():
    model = LinearClassifier().eval()
    report = evaluate_autoattack(
        model, [_batch(model)], pixel_box=BOX, epsilons=("1/255", "4/255"), version=TINY, seed=0
    )
    assert report.attack["name"] == "AutoAttack-test"
    assert "APGD-CE" in report.attack["description"] and "Square" in report.attack["description"]
    assert report.clean_accuracy == 1.0
    assert report.robust_accuracy["4/255"] <= report.robust_accuracy["1/255"] <= 1.0
    per_attack = report.attack["per_attack"]["4/255"]
    after = [per_attack[name]["accuracy_after"] for name in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert after == sorted(after, reverse=True) and after[-1] == report.robust_accuracy["4/255"]


def test_bad_version_and_budget_are_refused():
    model = LinearClassifier().eval()
    with pytest.raises(ValueError, match="version must be one of"):
        evaluate_autoattack(model, [_batch(model)], pixel_box=BOX, version="fast")
    with pytest.raises(ValueError, match="must be > 0"):
        evaluate_autoattack(model, [_batch(model)], pixel_box=BOX, epsilons=(0,))


def test_evaluation_leaves_the_callers_random_state_alone():
    model = LinearClassifier().eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_autoattack(model, [_batch(model)], pixel_box=BOX, epsilons=(1 / 255,), version=TINY, seed=7)
    assert torch.equal(torch.rand(3), expected)
