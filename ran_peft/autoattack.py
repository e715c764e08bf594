"""The reported robust accuracy: AutoAttack's standard set (APGD-CE, APGD-T, FAB-T, Square, from torchattacks) with
the per-sample worst case for class-prediction models, the strongest white-box attack on the answer tokens for
generative VLMs, and the masking checks that come with them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ran_peft.closed_set import (
    ClosedSetAnswers,
    expand_text_inputs,
    greedy_answers_right,
    group_by_prompt,
)
from ran_peft.evaluation import (
    Batch,
    GradientMaskingWarning,
    RobustnessReport,
    _evaluation_mode,
    _model_device,
    _to_device,
    _warn_failed_checks,
    evaluate_robustness,
    format_epsilon,
    parse_epsilon,
)
from ran_peft.families import (
    DualEncoderFamily,
    GenerativeFamily,
    ModelFamily,
    detect_family,
    unwrap_model,
)
from ran_peft.pixel_layout import BatchPixelBox, PixelLayout
from ran_peft.pixels import PixelBox

# ----------------------------------------------------------------------------------------------------------------
# AutoAttack: the reported robust accuracy of class-prediction models
# ----------------------------------------------------------------------------------------------------------------

AUTOATTACK_VERSIONS = ("standard", "quick")


@dataclass(frozen=True)
class AutoAttackSettings:
    """The attacks of one AutoAttack run, in the order they run (each on the samples the earlier ones left).

    `standard` is AutoAttack's standard set as RobustBench runs it (Croce and Hein 2020): APGD-CE and APGD-T (100
    iterations, 9 target classes at most), FAB-T (100 iterations, 9 targets at most), Square (5000 queries). `quick`
    is the same four attacks with fewer iterations, targets and queries; it is named as such wherever it is
    reported, never as AutoAttack.
    """

    version: str
    apgd_steps: int = 100
    targets: int = 9
    fab_steps: int = 100
    square_queries: int = 5000
    large_epsilon: float = 32 / 255
    large_steps: int = 100  # APGD-CE iterations of the large-budget check

    @property
    def name(self) -> str:
        return "AutoAttack" if self.version == "standard" else f"AutoAttack-{self.version}"

    def describe(self, classes: int | None = None) -> str:
        targets = self.targets if classes is None else min(self.targets, classes - 1)
        return (
            f"{self.name} (torchattacks: APGD-CE {self.apgd_steps} it., APGD-T {self.apgd_steps} it. x {targets} "
            f"targets, FAB-T {self.fab_steps} it. x {targets} targets, Square {self.square_queries} queries; "
            "L-inf in [0, 1] pixel units; per-sample worst case)"
        )


AUTOATTACK_SETTINGS = {
    "standard": AutoAttackSettings("standard"),
    "quick": AutoAttackSettings(
        "quick", apgd_steps=20, targets=3, fab_steps=10, square_queries=100, large_steps=10
    ),
}


class PixelSpaceClassifier(nn.Module):
    """A class-prediction model as torchattacks expects it: pixels `(N, C, H, W)` in [0, 1] -> class logits.

    The pixels are normalised for the model in `to_model_inputs` (the one place that knows the model's pixel layout
    and normalisation; `to_pixels` is its inverse); `pixel_box` is a `PixelBox`, or the `BatchPixelBox` the batch's
    pixel layout placed. Prompt-classifying dual encoders give the image-to-prompt logits; generative VLMs are read
    through `GenerativeClassifierView`. The wrapper never changes the model's train/eval modes (torchattacks calls
    `eval()`/`train()` on it): the evaluation sets them once with `attack_mode`, which keeps the flags some layers
    need.
    """

    def __init__(
        self, model: nn.Module, family: ModelFamily, pixel_box: PixelBox | BatchPixelBox, dtype: torch.dtype
    ):
        super().__init__()
        self._check_family(family)
        self.model = model
        self.family = family
        self.pixel_box = pixel_box
        self.dtype = dtype

    def _check_family(self, family: ModelFamily) -> None:
        if isinstance(family, GenerativeFamily):
            raise ValueError(
                "AutoAttack scores class predictions; a generative VLM's answers are token sequences. For closed-set "
                "questions pass `answers=ClosedSetAnswers.from_tokenizer(tokenizer, answers)` to evaluate_autoattack "
                "(the answers' first-token logits become class logits); for open questions use "
                "evaluate_robust_accuracy, which runs PGD on the answer-token loss."
            )
        if isinstance(family, DualEncoderFamily) and family.class_text_inputs is None:
            raise ValueError(
                "AutoAttack on a dual encoder needs `class_text_inputs` (one tokenised prompt per class): without "
                "them there are no class logits, only in-batch retrieval, which depends on the whole batch."
            )

    def to_model_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the normalised `pixel_values` the model takes."""
        return self.pixel_box.from_pixels(pixels).to(self.dtype)

    def to_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's `pixel_values` -> [0, 1] pixels (float32)."""
        return self.pixel_box.to_pixels(pixel_values)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        inputs: dict[str, Any] = {}
        if isinstance(
            self.family, DualEncoderFamily
        ):  # labels select prompt classification; the loss is unused
            inputs["labels"] = torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)
        return self.family.run(self.model, inputs, self.to_model_inputs(pixels)).logits.float()

    def train(self, mode: bool = True) -> PixelSpaceClassifier:
        return self


class GenerativeClassifierView(PixelSpaceClassifier):
    """A generative VLM on one closed-set question as a classifier of its images: pixels `(N, C, H, W)` in [0, 1] ->
    the class logits of `answers` (`ClosedSetAnswers.class_logits`) at the answer position.

    `text_inputs` is the prompt (everything before the answer: `input_ids`, `attention_mask`, ...), one row, shared by
    every image; torchattacks may call the view on any subset of the images, which is why the prompt must be shared.
    In a causal model the logits at the prompt's last position are those of the first answer token whether or not
    the answer follows, and they are what greedy generation's first step reads: the view's argmax is the class of
    the first token `generate` picks.
    """

    def __init__(
        self,
        model: nn.Module,
        answers: ClosedSetAnswers,
        text_inputs: Mapping[str, torch.Tensor],
        pixel_box: PixelBox | BatchPixelBox,
        dtype: torch.dtype,
    ):
        super().__init__(model, GenerativeFamily(), pixel_box, dtype)
        self.answers = answers
        self.text_inputs = dict(text_inputs)
        parameters = inspect.signature(unwrap_model(model).forward).parameters
        # Only the answer position's logits are read: models that can skip the others' vocabulary projection do.
        self.logits_to_keep = "logits_to_keep" in parameters

    def _check_family(self, family: ModelFamily) -> None:
        return None  # the answers make a generative model a classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        inputs = expand_text_inputs(self.text_inputs, pixels.shape[0])
        if self.logits_to_keep:
            inputs["logits_to_keep"] = 1
        logits = self.model(**inputs, pixel_values=self.to_model_inputs(pixels)).logits
        return self.answers.class_logits(logits[:, -1])


def _autoattack_steps(settings: AutoAttackSettings, epsilon: float, classes: int, seed: int):
    """The four attacks of `settings` at one budget, as (name, factory(classifier) -> torchattacks attack)."""
    import torchattacks

    targets = min(settings.targets, classes - 1) + 1  # torchattacks takes n_classes = targets + 1
    return [
        (
            "apgd-ce",
            lambda m: torchattacks.APGD(
                m, norm="Linf", eps=epsilon, steps=settings.apgd_steps, seed=seed, loss="ce"
            ),
        ),
        (
            "apgd-t",
            lambda m: torchattacks.APGDT(
                m, norm="Linf", eps=epsilon, steps=settings.apgd_steps, seed=seed, n_classes=targets
            ),
        ),
        (
            "fab-t",
            lambda m: torchattacks.FAB(
                m,
                norm="Linf",
                eps=epsilon,
                steps=settings.fab_steps,
                seed=seed,
                multi_targeted=True,
                n_classes=targets,
            ),
        ),
        (
            "square",
            lambda m: torchattacks.Square(
                m, norm="Linf", eps=epsilon, n_queries=settings.square_queries, seed=seed
            ),
        ),
    ]


def _within_budget(adversarial: torch.Tensor, pixels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`adversarial` projected on the L-inf ball of `pixels` and the [0, 1] box (guards against attack overshoot)."""
    return torch.minimum(torch.maximum(adversarial.float(), pixels - epsilon), pixels + epsilon).clamp(
        0.0, 1.0
    )


def autoattack_cascade(
    classifier: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    robust: torch.Tensor,
    epsilon: float,
    attacks: Sequence[tuple[str, Any]],
    examples: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
    """Run `attacks` in turn, each on the samples still robust; a sample is robust if no attack fooled it.

    `robust` (bool `[N]`) says which samples start robust (the clean-correct ones). Every adversarial example is
    projected on the budget and the pixel box and scored by a fresh forward pass, so a sample counts as fooled only
    by an input inside the threat model. Returns the final robust mask and, per attack, how many samples it fooled,
    how many stayed robust after it, and the largest L-inf perturbation it returned (pixel units, before the guard).
    `examples` (pixels like `pixels`), when given, receives in place the adversarial image of each sample an attack
    fooled (inside the budget); the others keep what they hold (torchattacks' attacks return the clean image for a
    sample they did not fool).
    """
    robust = robust.clone()
    per_attack: dict[str, dict[str, float]] = {}
    for name, make in attacks:
        rows = robust.nonzero().flatten()
        fooled_count, largest = 0, 0.0
        if rows.numel():
            attack = make(classifier)
            returned = attack(pixels[rows], labels[rows]).detach()
            # what the attack itself returned, before the guard below: the budget test reads it
            largest = float((returned.float() - pixels[rows]).abs().flatten(1).amax(1).max())
            adversarial = _within_budget(returned, pixels[rows], epsilon)
            with torch.no_grad():
                fooled = classifier(adversarial).argmax(-1).ne(labels[rows])
            robust[rows[fooled]] = False
            fooled_count = int(fooled.sum())
            if examples is not None:
                examples[rows[fooled]] = adversarial[fooled].to(examples.dtype)
        per_attack[name] = {
            "fooled": fooled_count,
            "robust_after": int(robust.sum()),
            "max_perturbation": largest,
        }
    return robust, per_attack


@dataclass
class _ClassificationView:
    """One attackable unit of a batch: a classifier over [0, 1] pixels, its samples and their labels."""

    classifier: PixelSpaceClassifier
    pixels: torch.Tensor
    labels: torch.Tensor
    answers: list[list[int]] | None = None  # generative rows: the answer tokens, for scoring `generate`


def _classification_views(
    model: nn.Module,
    family: ModelFamily,
    inputs: Mapping[str, Any],
    pixel_box: PixelBox,
    answers: ClosedSetAnswers | None,
    pixel_layout: str | PixelLayout,
) -> list[_ClassificationView]:
    """A batch as classifiers torchattacks can attack: the whole batch for class-prediction models, one view per
    prompt group for a generative VLM on closed-set questions."""
    dtype = inputs["pixel_values"].dtype
    if not isinstance(family, GenerativeFamily):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("AutoAttack needs `labels` (class indices) in every batch.")
        classifier = PixelSpaceClassifier(model, family, pixel_box, dtype)
        pixels = classifier.to_pixels(inputs["pixel_values"]).clamp(0.0, 1.0)
        scored = labels.ne(-100)
        return [_ClassificationView(classifier, pixels[scored], labels[scored])]
    if answers is None:
        raise ValueError(
            "AutoAttack on a generative VLM needs `answers` (a ClosedSetAnswers: the closed-set answers whose "
            "first-token logits are the class logits); open questions are scored with PGD on the answer-token loss "
            "(evaluate_robust_accuracy)."
        )
    placed = BatchPixelBox.place(pixel_box, inputs, pixel_layout)
    if (
        placed.placement.layout != "channels_first"
        or inputs["pixel_values"].dim() != 4
        or placed.real is not None
    ):
        raise ValueError(
            f"AutoAttack on a generative VLM takes one (C, H, W) image per sample without padding; this batch's "
            f"pixels are {placed.placement.layout} of shape {tuple(inputs['pixel_values'].shape)}. Evaluate it with "
            "PGD (evaluate_robustness), which follows every pixel layout."
        )
    views = []
    for group in group_by_prompt(inputs):
        first_tokens = torch.tensor([answer[0] for answer in group.answers], device=group.rows.device)
        labels = answers.class_of_tokens(first_tokens)
        outside = labels.eq(len(answers.answers)).nonzero().flatten().tolist()
        if outside:
            raise ValueError(
                f"a row's answer begins with token {int(first_tokens[outside[0]])}, which begins none of the closed-set "
                f"answers {list(answers.answers)}: AutoAttack scores closed-set questions only. Evaluate open questions "
                "with PGD on the answer-token loss (evaluate_robust_accuracy), apart from the closed ones."
            )
        classifier = GenerativeClassifierView(model, answers, group.text_inputs, placed, dtype)
        pixels = classifier.to_pixels(inputs["pixel_values"][group.rows]).clamp(0.0, 1.0)
        views.append(_ClassificationView(classifier, pixels, labels, group.answers))
    return views


def evaluate_autoattack(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    pixel_box: PixelBox,
    epsilons: Sequence[float | str] = (1 / 255, 2 / 255, 4 / 255),
    version: str | AutoAttackSettings = "standard",
    class_text_inputs: Mapping[str, torch.Tensor] | None = None,
    answers: ClosedSetAnswers | None = None,
    score_generation: bool = True,
    pixel_layout: str | PixelLayout = "auto",
    seed: int = 0,
    tolerance: float = 0.01,
    large_budget_tolerance: float = 0.05,
) -> RobustnessReport:
    """Clean accuracy and AutoAttack robust accuracy (per-sample worst case) of a class-prediction model.

    `version="standard"` runs AutoAttack's standard set (APGD-CE, APGD-T, FAB-T, Square, from torchattacks) at each
    L-inf budget of `epsilons` ([0, 1] pixel units; `pixel_box`, placed over each batch by its pixel layout, converts
    them); `version="quick"` the same attacks with fewer iterations (reported as `AutoAttack-quick`). A sample is
    robust at a budget if it is right on the clean input and no attack fooled it. `report.attack["per_attack"]`
    holds, per budget and attack, the accuracy left after it. Classifiers, prompt-classifying dual encoders
    (`class_text_inputs`), and generative VLMs on closed-set questions (`answers`: the answers' first-token logits at
    the answer position are the class logits, `GenerativeClassifierView`; rows are attacked in groups that share
    their prompt). For generative VLMs with `score_generation`, greedy `generate` is also scored, clean and on the
    worst adversarial image found for each sample at each budget (exact match of the whole answer):
    `report.generation`.

    Budgets run from the smallest up, each on the samples the smaller one left (a sample fooled inside a small ball
    is fooled inside every larger one), so accuracy cannot rise with the budget. Gradient-masking checks (warned with
    `GradientMaskingWarning`, recorded in `report.checks`): the black-box Square fools no more than `tolerance` of
    the samples the white-box attacks left; APGD-CE at `settings.large_epsilon` (32/255) leaves at most
    `large_budget_tolerance` accurate. The random state of the caller is restored afterwards (torchattacks seeds
    torch's global generator).
    """
    if isinstance(version, AutoAttackSettings):
        settings = version
    elif version in AUTOATTACK_SETTINGS:
        settings = AUTOATTACK_SETTINGS[version]
    else:
        raise ValueError(
            f"version must be one of {sorted(AUTOATTACK_SETTINGS)} or an AutoAttackSettings, got {version!r}."
        )
    values: dict[str, float] = {}
    for epsilon in epsilons:
        value = parse_epsilon(epsilon)
        if value <= 0:
            raise ValueError(f"AutoAttack budgets must be > 0 pixel units, got {epsilon!r}.")
        values.setdefault(format_epsilon(value), value)
    if not values:
        raise ValueError("epsilons must hold at least one budget.")
    keys = sorted(values, key=values.get)
    family = detect_family(model, class_text_inputs)
    generative = isinstance(family, GenerativeFamily)
    device = _model_device(model)
    total = clean_right = large_right = 0
    robust_right = dict.fromkeys(keys, 0)
    generated_right = dict.fromkeys(["clean", *keys], 0)
    per_attack: dict[str, dict[str, dict[str, float]]] = {key: {} for key in keys}
    classes = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _evaluation_mode(model):
        for batch in batches:
            inputs = _to_device(batch, device)
            family.check_inputs(inputs)
            for view in _classification_views(model, family, inputs, pixel_box, answers, pixel_layout):
                classifier, pixels, labels = view.classifier, view.pixels, view.labels
                if labels.numel() == 0:
                    continue
                with torch.no_grad():
                    logits = classifier(pixels)
                classes = logits.shape[-1]
                if classes < 4:
                    raise ValueError(
                        f"AutoAttack's targeted attacks need at least 4 classes (their DLR loss reads the 4th "
                        f"logit); this model has {classes}. Use evaluate_robustness (PGD) instead."
                    )
                clean = logits.argmax(-1).eq(labels)
                total += labels.numel()
                clean_right += int(clean.sum())
                scoring = generative and score_generation
                if scoring:
                    generated_clean = _greedy_right(classifier, pixels, view.answers)
                    generated_right["clean"] += int(generated_clean.sum())
                # Budgets from the smallest up: a sample fooled at a smaller budget is fooled at every larger one
                # (its adversarial example lies inside the larger ball too), so only the survivors are attacked again.
                robust = clean
                examples = pixels.clone()
                for key in keys:
                    attacks = _autoattack_steps(settings, values[key], classes, seed)
                    robust, counts = autoattack_cascade(
                        classifier, pixels, labels, robust, values[key], attacks, examples
                    )
                    robust_right[key] += int(robust.sum())
                    if scoring:
                        # a sample wrong on the clean image is wrong at every budget: its clean image is in the ball
                        generated = _greedy_right(classifier, examples, view.answers) & generated_clean
                        generated_right[key] += int(generated.sum())
                    for name, numbers in counts.items():
                        entry = per_attack[key].setdefault(
                            name, {"fooled": 0, "robust_after": 0, "max_perturbation": 0.0}
                        )
                        entry["fooled"] += numbers["fooled"]
                        entry["robust_after"] += numbers["robust_after"]
                        entry["max_perturbation"] = max(
                            entry["max_perturbation"], numbers["max_perturbation"]
                        )
                large_settings = replace(settings, apgd_steps=settings.large_steps)
                large = _autoattack_steps(large_settings, settings.large_epsilon, classes, seed)[:1]
                survived, _ = autoattack_cascade(
                    classifier, pixels, labels, clean, settings.large_epsilon, large
                )
                large_right += int(survived.sum())
    if total == 0:
        raise ValueError("no sample could be scored: the batches were empty or every label was -100.")

    robust_accuracy = {key: robust_right[key] / total for key in keys}
    checks = {
        "epsilon_zero_equals_clean": {"passed": None, "skipped": "AutoAttack has no zero budget"},
        "non_increasing_in_epsilon": {
            "passed": None,
            "skipped": "non-increasing by construction: each budget's attacks start from the smaller budget's survivors",
        },
    }
    square_share = {key: per_attack[key]["square"]["fooled"] / total for key in keys}
    checks["black_box_not_stronger"] = {
        "passed": all(share <= tolerance for share in square_share.values()),
        "square_fooled_after_white_box": square_share,
        "tolerance": tolerance,
    }
    large_accuracy = large_right / total
    checks["large_budget_near_zero"] = {
        "passed": large_accuracy <= large_budget_tolerance,
        "epsilon": format_epsilon(settings.large_epsilon),
        "attack": f"APGD-CE {settings.large_steps} it.",
        "accuracy": large_accuracy,
        "tolerance": large_budget_tolerance,
    }
    _warn_failed_checks(checks)
    _warn_autoattack_checks(checks)
    description = settings.describe(classes)
    if generative:
        description += (
            f"; generative VLM read as a classifier over {len(answers.answers)} closed-set answers (their first "
            f"tokens' logits at the answer position) and {answers.other_classes} strongest other token(s)"
        )
    attack_info = {
        "name": settings.name,
        "description": description,
        "version": settings.version,
        "attacks": [name for name, _ in _autoattack_steps(settings, 1.0, classes or 10, seed)],
        "norm": "linf",
        "seed": seed,
        "per_attack": {
            key: {
                name: {**numbers, "accuracy_after": numbers["robust_after"] / total}
                for name, numbers in per_attack[key].items()
            }
            for key in keys
        },
    }
    generation = None
    if generative and score_generation:
        generation = {
            "description": (
                "greedy generate, exact match of the whole answer (EOS included), on the clean images and on the "
                f"worst adversarial image {settings.name} found for each sample at each budget"
            ),
            "clean_accuracy": generated_right["clean"] / total,
            "robust_accuracy": {key: generated_right[key] / total for key in keys},
        }
    return RobustnessReport(clean_right / total, robust_accuracy, attack_info, total, checks, generation)


def closed_set_clean_accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    pixel_box: PixelBox,
    answers: ClosedSetAnswers,
    pixel_layout: str | PixelLayout = "auto",
) -> dict[str, Any]:
    """Clean accuracy of a generative VLM on closed-set questions, without an attack: the classifier view's (the
    first answer token, as `evaluate_autoattack` scores it) and greedy `generate`'s (exact match of the whole
    answer). JSON-ready: `clean_accuracy`, `generation["clean_accuracy"]`, `num_samples`."""
    family = detect_family(model)
    device = _model_device(model)
    total = view_right = generated_right = 0
    with _evaluation_mode(model):
        for batch in batches:
            inputs = _to_device(batch, device)
            family.check_inputs(inputs)
            for view in _classification_views(model, family, inputs, pixel_box, answers, pixel_layout):
                with torch.no_grad():
                    view_right += int(view.classifier(view.pixels).argmax(-1).eq(view.labels).sum())
                generated_right += int(_greedy_right(view.classifier, view.pixels, view.answers).sum())
                total += view.labels.numel()
    if total == 0:
        raise ValueError("no sample could be scored: the batches were empty or held no answer tokens.")
    return {
        "clean_accuracy": view_right / total,
        "generation": {"clean_accuracy": generated_right / total},
        "num_samples": total,
    }


def _greedy_right(
    classifier: GenerativeClassifierView, pixels: torch.Tensor, answers: list[list[int]]
) -> torch.Tensor:
    """Which greedy answers generated from `pixels` ([0, 1]) with the view's prompt are right (bool `[N]`)."""
    right = greedy_answers_right(
        classifier.model, classifier.text_inputs, classifier.to_model_inputs(pixels), answers
    )
    return right.to(pixels.device)


def _warn_autoattack_checks(checks: Mapping[str, Mapping[str, Any]]) -> None:
    black_box = checks.get("black_box_not_stronger", {})
    if black_box.get("passed") is False:
        warnings.warn(
            "GRADIENT MASKING SUSPECTED: the black-box Square attack fooled samples every white-box attack missed "
            f"(share of samples per budget: {black_box['square_fooled_after_white_box']}); the gradients the "
            "white-box attacks follow do not lead to the adversarial examples the model has.",
            GradientMaskingWarning,
            stacklevel=3,
        )
    large = checks.get("large_budget_near_zero", {})
    if large.get("passed") is False:
        warnings.warn(
            f"GRADIENT MASKING SUSPECTED: at epsilon {large['epsilon']} {large['attack']} still leaves "
            f"{large['accuracy']:.4f} accurate; a budget that large should bring any model near 0.",
            GradientMaskingWarning,
            stacklevel=3,
        )


def evaluate_robust_accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    pixel_box: PixelBox,
    epsilons: Sequence[float | str] = (1 / 255, 2 / 255, 4 / 255),
    quick: bool = False,
    class_text_inputs: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> RobustnessReport:
    """The robust accuracy to report: AutoAttack (or AutoAttack-quick) for class predictions; for generative VLMs'
    open questions, whose answers are no class AutoAttack can score, PGD-100 with 3 restarts on the answer-token loss
    (PGD-50, 2 restarts, when `quick`), labelled with what it is. (Closed-set questions of a generative VLM:
    `evaluate_autoattack(..., answers=...)`.)
    """
    family = detect_family(model, class_text_inputs)
    if isinstance(family, GenerativeFamily) or (
        isinstance(family, DualEncoderFamily) and class_text_inputs is None
    ):
        steps, restarts = (50, 2) if quick else (100, 3)
        report = evaluate_robustness(
            model,
            batches,
            pixel_box=pixel_box,
            epsilons=epsilons,
            steps=steps,
            restarts=restarts,
            class_text_inputs=class_text_inputs,
            seed=seed,
        )
        report.attack["description"] = (
            f"PGD-{steps}, {restarts} restarts, on the {family.name} task loss (AutoAttack needs class predictions); "
            "per-sample worst case"
        )
        return report
    return evaluate_autoattack(
        model,
        batches,
        pixel_box=pixel_box,
        epsilons=epsilons,
        version="quick" if quick else "standard",
        class_text_inputs=class_text_inputs,
        seed=seed,
    )
