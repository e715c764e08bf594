"""Clean and adversarial evaluation: robust accuracy under PGD / FGSM (per-sample worst case over restarts) and
loud checks for gradient masking. Representation metrics (zero-shot, retrieval, linear probe) are in
`ran_peft.representation`.
"""

# Metrics are plain torch on purpose: `evaluate.load("accuracy")` fetches its metric script from the Hugging Face
# Hub, which fails offline (checked: "Couldn't find a module script ... accuracy.py"), and an accuracy is the mean
# of a boolean tensor anyway.

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ran_peft.attacks import AttackBudget, deterministic_training_mode, pgd_perturb
from ran_peft.families import (
    DualEncoderFamily,
    FamilyOutput,
    GenerativeFamily,
    ModelFamily,
    detect_family,
)
from ran_peft.pixel_layout import BatchPixelBox, PixelLayout
from ran_peft.pixels import PixelBox

Batch = Mapping[str, Any]

ATTACKS = ("pgd", "fgsm")
PGD_STEP_RULE = "2.5*epsilon/steps"
# Seeds of restart r are `seed + r * _RESTART_SEED_STRIDE`: restart r draws the same random start whatever the
# number of restarts, so adding restarts can only add chances to fool a sample.
_RESTART_SEED_STRIDE = 1_000_003


class GradientMaskingWarning(UserWarning):
    """The robust accuracies behave as they cannot under a working attack: they likely overstate robustness."""


# ----------------------------------------------------------------------------------------------------------------
# Epsilons
# ----------------------------------------------------------------------------------------------------------------


def format_epsilon(epsilon: float) -> str:
    """The report key of a budget: `"k/255"` when it is a whole number of 8-bit levels, `"0"`, else a decimal."""
    value = parse_epsilon(epsilon)
    if value == 0:
        return "0"
    levels = round(value * 255)
    if levels > 0 and math.isclose(value * 255, levels, rel_tol=1e-9, abs_tol=1e-6):
        return f"{levels}/255"
    return f"{value:.10g}"


def parse_epsilon(epsilon: float | str) -> float:
    """A budget in [0, 1] pixel units from a number or a key such as `"4/255"` or `"0.03"`."""
    value = epsilon
    if isinstance(epsilon, str):
        numerator, slash, denominator = epsilon.partition("/")
        try:
            value = float(numerator) / float(denominator) if slash else float(numerator)
        except (ValueError, ZeroDivisionError) as error:
            raise ValueError(
                f"cannot read the epsilon {epsilon!r}: write it as a number or as 'k/255'."
            ) from error
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"epsilon must be a finite number >= 0 (pixel units in [0, 1]), got {epsilon!r}.")
    return value


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RobustnessReport:
    """Clean and robust accuracy of one evaluation, with the attack that produced them and the masking checks."""

    clean_accuracy: float
    """Share of the scored samples the model gets right on clean inputs."""
    robust_accuracy: dict[str, float]
    """Per budget key (`"1/255"`, ...): share of samples right on the clean input and under every restart."""
    attack: dict[str, Any]
    """How the attack was run: name, steps, restarts, step rule, norm, random start, seed."""
    num_samples: int
    """Samples scored (generative samples without answer tokens and classifier labels of -100 are not)."""
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Gradient-masking checks by name: `passed` (True / False / None when skipped) and the numbers behind it."""
    generation: dict[str, Any] | None = None
    """Generative VLMs under AutoAttack: the greedy `generate` answers scored on the clean images and on the
    adversarial images found (`clean_accuracy`, `robust_accuracy` per budget, `description`); None otherwise."""

    @property
    def passed_checks(self) -> bool:
        """No check failed (skipped checks do not fail)."""
        return all(check.get("passed") is not False for check in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (plain floats, ints, strings, bools, lists and dicts)."""
        return {
            "clean_accuracy": float(self.clean_accuracy),
            "robust_accuracy": {key: float(value) for key, value in self.robust_accuracy.items()},
            "attack": copy.deepcopy(self.attack),
            "num_samples": int(self.num_samples),
            "checks": copy.deepcopy(self.checks),
            "passed_checks": self.passed_checks,
            **({"generation": copy.deepcopy(self.generation)} if self.generation is not None else {}),
        }

    def markdown_table(self) -> str:
        """Accuracy per budget as a Markdown table, with the attack and the check verdict below it."""
        rows = ["| epsilon | accuracy |", "| --- | --- |", f"| clean | {100 * self.clean_accuracy:.2f}% |"]
        rows += [f"| {key} | {100 * value:.2f}% |" for key, value in self.robust_accuracy.items()]
        attack = self.attack
        description = (
            f"{attack['description']}; {self.num_samples} samples."
            if "description" in attack
            else (
                f"{str(attack.get('name', '?')).upper()}-{attack.get('steps')} ({attack.get('norm')}), "
                f"{attack.get('restarts')} restart(s), step {attack.get('step_size')}, seed {attack.get('seed')}; "
                f"{self.num_samples} samples."
            )
        )
        failed = [name for name, check in self.checks.items() if check.get("passed") is False]
        verdict = (
            f"**Gradient-masking checks FAILED: {', '.join(failed)}** — these robust numbers are not trustworthy."
            if failed
            else "Gradient-masking checks: passed."
        )
        return "\n".join([*rows, "", description, verdict])


# ----------------------------------------------------------------------------------------------------------------
# Per-sample correctness
# ----------------------------------------------------------------------------------------------------------------


def prediction_correctness(
    family: ModelFamily, output: FamilyOutput, inputs: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples of one forward pass are right, and which can be scored at all (two bool tensors `[B]`).

    - classifiers and prompt classification (dual encoder with `labels`): argmax of the logits equals the label
      (labels of -100 are not scored);
    - contrastive dual encoders (no `labels`): image-to-text retrieval in the batch, right when the image's own
      caption (the diagonal) scores strictly above every other caption (a tie is a miss, so collapsed
      embeddings cannot look right);
    - generative VLMs: the answer is right when the teacher-forced next-token argmax equals the label at every
      counted answer position (exact match); samples with no answer token are not scored.
    """
    logits = output.logits
    if logits is None:
        raise ValueError(f"the {family.name} model returned no logits: there is no prediction to score.")
    if isinstance(family, GenerativeFamily):
        if output.logits_mask is None:
            raise ValueError(
                "a generative model's output needs `logits_mask` (the counted answer positions)."
            )
        labels = inputs["labels"].to(logits.device)
        counted = output.logits_mask.to(logits.device)
        # position t predicts token t + 1: align the labels with the position that predicts them
        next_labels = torch.full_like(labels, -100)
        next_labels[:, :-1] = labels[:, 1:]
        token_right = logits.argmax(-1).eq(next_labels) | ~counted
        scored = counted.any(dim=1)
        return token_right.all(dim=1) & scored, scored
    if logits.dim() != 2:
        raise ValueError(
            f"the {family.name} model's logits have shape {tuple(logits.shape)}; expected [batch, classes]."
        )
    labels = inputs.get("labels")
    if labels is None:
        if not isinstance(family, DualEncoderFamily):
            raise ValueError(f"the {family.name} model needs `labels` in the batch to be scored.")
        if logits.shape[0] != logits.shape[1]:
            raise ValueError(
                f"contrastive logits_per_image has shape {tuple(logits.shape)}: in-batch retrieval needs one caption "
                "per image (a square matrix)."
            )
        diagonal = logits.diagonal()
        others = logits.masked_fill(
            torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device), -math.inf
        )
        correct = diagonal > others.amax(dim=1)
        return correct, torch.ones_like(correct)
    labels = labels.to(logits.device)
    if labels.dim() != 1:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}; accuracy needs one class index per sample (shape [batch])."
        )
    scored = labels.ne(-100)
    return logits.argmax(-1).eq(labels) & scored, scored


# ----------------------------------------------------------------------------------------------------------------
# Evaluation plumbing
# ----------------------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"each batch must be a dict of model inputs (as a DataLoader with a collator gives), got {type(batch).__name__}."
        )
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The deterministic model (see `deterministic_training_mode`), and parameters that do not require gradients,
    both restored afterwards.

    The attack only needs input gradients; with the parameters frozen its backward passes build no graph for
    weight gradients (less memory), and no `.grad` of the user's parameters can be touched.
    """
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    with deterministic_training_mode(model):
        try:
            for parameter, _ in requires_grad:
                parameter.requires_grad_(False)
            yield
        finally:
            for parameter, flag in requires_grad:
                parameter.requires_grad_(flag)


def _correctness(
    model: nn.Module, family: ModelFamily, inputs: Batch, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        output = family.run(model, inputs, pixel_values)
    return prediction_correctness(family, output, inputs)


def _attack_batch(
    model: nn.Module,
    family: ModelFamily,
    inputs: Batch,
    box: PixelBox | BatchPixelBox,
    budget: AttackBudget,
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attack once per generator (restart); return (right under every restart, the worst adversarial pixels).

    A sample's worst adversarial example is the first one that fooled it, else the last restart's. Samples are
    the pixels' first dim, or for patch rows each image's rows (one image per sample).
    """

    def task_loss(adversarial_pixels: torch.Tensor, text: Any) -> torch.Tensor:
        loss = family.run(model, inputs, adversarial_pixels).loss
        if loss is None:
            raise ValueError(
                f"the {family.name} model returned no loss: the attack maximises the task loss, so the batch needs "
                "what the loss needs (`labels`, or captions for a contrastive model)."
            )
        return loss

    pixel_values = inputs["pixel_values"]
    if isinstance(box, PixelBox):
        box = BatchPixelBox.place(box, inputs)
    survived: torch.Tensor | None = None
    worst = pixel_values
    for generator in generators:
        adversarial = pgd_perturb(task_loss, pixel_values, box, budget, generator=generator)
        correct, _ = _correctness(model, family, inputs, adversarial)
        if survived is None:
            survived, worst = correct.clone(), adversarial.clone()
        else:
            fooled_now = _per_pixel_sample(box, survived & ~correct)
            worst[fooled_now] = adversarial[fooled_now]
            still_right = _per_pixel_sample(box, survived & correct)
            worst[still_right] = adversarial[still_right]
            survived &= correct
    if survived is None:
        raise ValueError("the attack needs at least one restart.")
    return survived, worst


def _per_pixel_sample(box: BatchPixelBox, flags: torch.Tensor) -> torch.Tensor:
    """Per-sample flags as an index over the pixels' first dim (patch rows: each image's rows)."""
    rows = box.placement.sample_rows
    if rows is not None and len(rows) == flags.shape[0]:
        return flags.repeat_interleave(torch.tensor(rows, device=flags.device))
    return flags


def _budget(attack: str, epsilon: float, steps: int, step_size: float | None, norm: str) -> AttackBudget:
    if attack == "fgsm":
        return AttackBudget(epsilon=epsilon, step_size=epsilon, steps=1, norm=norm, random_start=False)
    size = step_size if step_size is not None else 2.5 * epsilon / steps
    return AttackBudget(epsilon=epsilon, step_size=size, steps=steps, norm=norm, random_start=True)


class _Generators:
    """One random stream per (attack, restart), made on the pixels' device when first needed."""

    def __init__(self, seed: int):
        self.seed = seed
        self.streams: dict[tuple[str, int], torch.Generator] = {}

    def for_restarts(self, name: str, restarts: int, device: torch.device) -> list[torch.Generator]:
        generators = []
        for restart in range(restarts):
            key = (name, restart)
            if key not in self.streams:
                generator = torch.Generator(device=device)
                generator.manual_seed(self.seed + restart * _RESTART_SEED_STRIDE)
                self.streams[key] = generator
            generators.append(self.streams[key])
        return generators


# ----------------------------------------------------------------------------------------------------------------
# Gradient-masking checks
# ----------------------------------------------------------------------------------------------------------------


def gradient_masking_checks(
    clean_accuracy: float,
    robust_accuracy: Mapping[str, float],
    *,
    epsilon_zero_accuracy: float | None = None,
    epsilon_zero_mismatches: int | None = None,
    weaker_attack: Mapping[str, Any] | None = None,
    tolerance: float = 0.01,
) -> dict[str, dict[str, Any]]:
    """Checks that fail when robust accuracies behave as they cannot under a working attack.

    - `epsilon_zero_equals_clean`: a zero budget must give the clean predictions, sample by sample
      (`epsilon_zero_mismatches` samples differ; without it the accuracies are compared). A failure means the
      pixels lie outside the pixel box (wrong image mean/std) or the model is not deterministic in eval mode.
    - `non_increasing_in_epsilon`: accuracy must not rise with the budget, clean counting as budget 0. The raw
      numbers are compared (never made monotone by combining budgets, which would hide the problem); a rise
      beyond `tolerance` means the attack fails to find examples a smaller budget found.
    - `more_steps_not_weaker`: `weaker_attack` holds `robust_accuracy` (full attack) and `weaker_robust_accuracy`
      (the same attack with fewer steps) at one budget; fewer steps must not give lower accuracy beyond
      `tolerance`. Skipped (`passed` None) without it.
    """
    checks: dict[str, dict[str, Any]] = {}
    if epsilon_zero_accuracy is None:
        checks["epsilon_zero_equals_clean"] = {"passed": None, "skipped": "no zero-budget pass was run"}
    else:
        if epsilon_zero_mismatches is not None:
            passed = epsilon_zero_mismatches == 0
        else:
            passed = math.isclose(epsilon_zero_accuracy, clean_accuracy, abs_tol=1e-12)
        checks["epsilon_zero_equals_clean"] = {
            "passed": passed,
            "clean_accuracy": float(clean_accuracy),
            "epsilon_zero_accuracy": float(epsilon_zero_accuracy),
            "mismatched_samples": epsilon_zero_mismatches,
        }

    points = [("clean", 0.0, float(clean_accuracy))]
    points += sorted(
        ((key, parse_epsilon(key), float(value)) for key, value in robust_accuracy.items()),
        key=lambda p: p[1],
    )
    violations = []
    for (small_key, small_eps, small_acc), (large_key, large_eps, large_acc) in itertools.combinations(
        points, 2
    ):
        if large_eps >= small_eps and large_acc > small_acc + tolerance:
            violations.append(
                {
                    "smaller": small_key,
                    "larger": large_key,
                    "smaller_accuracy": small_acc,
                    "larger_accuracy": large_acc,
                }
            )
    checks["non_increasing_in_epsilon"] = {
        "passed": not violations,
        "accuracy": {key: acc for key, _, acc in points},
        "violations": violations,
        "tolerance": tolerance,
    }

    if weaker_attack is None:
        checks["more_steps_not_weaker"] = {"passed": None, "skipped": "no weaker attack was run"}
    else:
        strong = float(weaker_attack["robust_accuracy"])
        weak = float(weaker_attack["weaker_robust_accuracy"])
        checks["more_steps_not_weaker"] = {
            **weaker_attack,
            "passed": not weak < strong - tolerance,
            "tolerance": tolerance,
        }
    return checks


def _warn_failed_checks(checks: Mapping[str, Mapping[str, Any]]) -> None:
    advice = (
        "The attack is not finding adversarial examples the model has, so the robust accuracy overstates "
        "robustness (gradient masking / obfuscated gradients). Look for non-differentiable or randomised "
        "preprocessing inside the model, check the pixel box, and re-run with more steps and restarts."
    )
    zero = checks.get("epsilon_zero_equals_clean", {})
    if zero.get("passed") is False:
        warnings.warn(
            f"GRADIENT MASKING CHECK FAILED: a zero budget changes predictions ({zero.get('mismatched_samples')} "
            f"samples; clean {zero['clean_accuracy']:.4f} vs epsilon 0 {zero['epsilon_zero_accuracy']:.4f}). "
            "The pixels are probably outside the pixel box (wrong image mean/std), or the model is not "
            "deterministic in eval mode.",
            GradientMaskingWarning,
            stacklevel=3,
        )
    monotone = checks.get("non_increasing_in_epsilon", {})
    if monotone.get("passed") is False:
        rises = "; ".join(
            f"{v['smaller']}: {v['smaller_accuracy']:.4f} -> {v['larger']}: {v['larger_accuracy']:.4f}"
            for v in monotone["violations"]
        )
        warnings.warn(
            f"GRADIENT MASKING SUSPECTED: robust accuracy rises with epsilon ({rises}). {advice}",
            GradientMaskingWarning,
            stacklevel=3,
        )
    steps = checks.get("more_steps_not_weaker", {})
    if steps.get("passed") is False:
        warnings.warn(
            f"GRADIENT MASKING SUSPECTED: at epsilon {steps.get('epsilon')} the attack with {steps.get('weaker_steps')} "
            f"steps leaves {steps['weaker_robust_accuracy']:.4f} robust but with {steps.get('steps')} steps "
            f"{steps['robust_accuracy']:.4f}: more steps made the attack weaker. {advice}",
            GradientMaskingWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------------------
# Public evaluations
# ----------------------------------------------------------------------------------------------------------------


def clean_accuracy(
    model: nn.Module, batches: Iterable[Batch], *, class_text_inputs: Mapping[str, torch.Tensor] | None = None
) -> float:
    """Accuracy on clean inputs (eval mode, no gradients), scored as `prediction_correctness` says."""
    family = detect_family(model, class_text_inputs)
    device = _model_device(model)
    right = total = 0
    with _evaluation_mode(model):
        for batch in batches:
            inputs = _to_device(batch, device)
            family.check_inputs(inputs)
            correct, scored = _correctness(model, family, inputs, inputs["pixel_values"])
            right += int(correct.sum())
            total += int(scored.sum())
    if total == 0:
        raise ValueError(
            "no sample could be scored: the batches were empty or held no labels / answer tokens."
        )
    return right / total


def evaluate_robustness(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    pixel_box: PixelBox,
    epsilons: Sequence[float | str] = (1 / 255, 2 / 255, 4 / 255),
    attack: str = "pgd",
    steps: int = 20,
    restarts: int = 1,
    step_size: float | None = None,
    norm: str = "linf",
    class_text_inputs: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    check_steps: bool = True,
    tolerance: float = 0.01,
    pixel_layout: str | PixelLayout = "auto",
) -> RobustnessReport:
    """Clean and robust accuracy of `model` over `batches` (any iterable of batch dicts, iterated once).

    The attack maximises the family's task loss (cross-entropy, the contrastive loss, or the answer-token
    language-model loss) inside the `epsilon` ball in [0, 1] pixel units (`pixel_box` converts them), in eval
    mode, without parameter gradients; the model's modes and flags are restored afterwards.

    - `attack="pgd"`: `steps` steps of size `step_size` (default 2.5 * epsilon / steps) from a random start,
      `restarts` times; `attack="fgsm"`: one step of size epsilon, no random start (deterministic, 1 restart).
    - Per-sample worst case: a sample is robust only if it is right on the clean input (the zero perturbation is
      in the threat set) and under every restart.
    - Gradient masking is checked (`gradient_masking_checks`): a zero budget must reproduce the clean
      predictions, accuracy must not rise with epsilon, and (`check_steps`, costs one more attack at the largest
      epsilon) PGD with `steps // 2` steps must not beat PGD with `steps` by more than `tolerance`. A failure
      warns with `GradientMaskingWarning` and is recorded in `report.checks`.
    - `class_text_inputs`: tokenised class prompts for prompt-based classification with a dual encoder.
    - `pixel_layout`: where each batch's channels and padding are (`"auto"`: recognised from the batch; see
      `ran_peft.pixel_layout`); padding is never perturbed.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}.")
    if attack == "fgsm" and (restarts != 1 or step_size is not None):
        raise ValueError(
            "fgsm is one deterministic step of size epsilon: leave restarts=1 and step_size=None "
            f"(got restarts={restarts}, step_size={step_size})."
        )
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be > 0 (pixel units) or None for {PGD_STEP_RULE}, got {step_size}.")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    values: dict[str, float] = {}
    for epsilon in epsilons:
        value = parse_epsilon(epsilon)
        values.setdefault(format_epsilon(value), value)
    if not values:
        raise ValueError("epsilons must hold at least one budget.")
    keys = sorted(values, key=values.get)
    budgets = {key: _budget(attack, values[key], steps, step_size, norm) for key in keys if values[key] > 0}
    # A zero budget cannot move the input, so one step exercises the whole path (projection and pixel-box clamp)
    zero_budget = AttackBudget(epsilon=0.0, step_size=0.0, steps=1, norm=norm, random_start=False)
    largest = keys[-1]
    weaker_budget = None
    if check_steps and attack == "pgd" and steps >= 2 and values[largest] > 0:
        weaker_budget = _budget(attack, values[largest], steps // 2, step_size, norm)

    family = detect_family(model, class_text_inputs)
    device = _model_device(model)
    generators = _Generators(seed)
    clean_right = zero_right = zero_mismatches = weaker_right = total = 0
    robust_right = dict.fromkeys(keys, 0)
    with _evaluation_mode(model):
        for batch in batches:
            inputs = _to_device(batch, device)
            family.check_inputs(inputs)
            placed = BatchPixelBox.place(pixel_box, inputs, pixel_layout)
            pixel_device = inputs["pixel_values"].device
            clean, scored = _correctness(model, family, inputs, inputs["pixel_values"])
            total += int(scored.sum())
            clean_right += int(clean.sum())

            zero, _ = _attack_batch(model, family, inputs, placed, zero_budget, [None])
            zero_right += int(zero.sum())
            zero_mismatches += int((zero.ne(clean) & scored).sum())
            for key in keys:
                if key not in budgets:  # epsilon 0
                    robust_right[key] += int((clean & zero).sum())
                    continue
                streams = generators.for_restarts(key, restarts, pixel_device)
                survived, _ = _attack_batch(model, family, inputs, placed, budgets[key], streams)
                robust_right[key] += int((clean & survived).sum())
            if weaker_budget is not None:
                # the same random starts as the full attack, so the number of steps is the only difference
                streams = generators.for_restarts(f"weaker {largest}", restarts, pixel_device)
                survived, _ = _attack_batch(model, family, inputs, placed, weaker_budget, streams)
                weaker_right += int((clean & survived).sum())
    if total == 0:
        raise ValueError(
            "no sample could be scored: the batches were empty or held no labels / answer tokens."
        )

    robust_accuracy = {key: robust_right[key] / total for key in keys}
    weaker = None
    if weaker_budget is not None:
        weaker = {
            "epsilon": largest,
            "steps": steps,
            "weaker_steps": weaker_budget.steps,
            "robust_accuracy": robust_accuracy[largest],
            "weaker_robust_accuracy": weaker_right / total,
        }
    checks = gradient_masking_checks(
        clean_right / total,
        robust_accuracy,
        epsilon_zero_accuracy=zero_right / total,
        epsilon_zero_mismatches=zero_mismatches,
        weaker_attack=weaker,
        tolerance=tolerance,
    )
    if weaker is None:
        reason = "fgsm has a single step" if attack == "fgsm" else "check_steps=False, steps < 2 or epsilon 0"
        checks["more_steps_not_weaker"]["skipped"] = reason
    _warn_failed_checks(checks)
    attack_info = {
        "name": attack,
        "steps": 1 if attack == "fgsm" else steps,
        "restarts": 1 if attack == "fgsm" else restarts,
        "step_size": "epsilon"
        if attack == "fgsm"
        else (PGD_STEP_RULE if step_size is None else float(step_size)),
        "norm": norm,
        "random_start": attack == "pgd",
        "loss": f"{family.name} task loss",
        "seed": seed,
    }
    return RobustnessReport(clean_right / total, robust_accuracy, attack_info, total, checks)
