"""Clean and adversarial evaluation: robust accuracy under PGD / FGSM (per-sample worst case over restarts),
zero-shot and retrieval metrics for dual encoders, and loud checks for gradient masking.
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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ran_peft.attacks import AttackBudget, attack_mode, pgd_perturb
from ran_peft.families import (
    DualEncoderFamily,
    FamilyOutput,
    GenerativeFamily,
    ModelFamily,
    detect_family,
    unwrap_model,
)
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
    """Eval mode, and parameters that do not require gradients, both restored afterwards.

    The attack only needs input gradients; with the parameters frozen its backward passes build no graph for
    weight gradients (less memory), and no `.grad` of the user's parameters can be touched.
    """
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    with attack_mode(model):
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
    box: PixelBox,
    budget: AttackBudget,
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attack once per generator (restart); return (right under every restart, the worst adversarial pixels).

    A sample's worst adversarial example is the first one that fooled it, else the last restart's.
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
    survived: torch.Tensor | None = None
    worst = pixel_values
    for generator in generators:
        adversarial = pgd_perturb(task_loss, pixel_values, box, budget, generator=generator)
        correct, _ = _correctness(model, family, inputs, adversarial)
        if survived is None:
            survived, worst = correct.clone(), adversarial.clone()
        else:
            fooled_now = survived & ~correct
            worst[fooled_now] = adversarial[fooled_now]
            still_right = survived & correct
            worst[still_right] = adversarial[still_right]
            survived &= correct
    if survived is None:
        raise ValueError("the attack needs at least one restart.")
    return survived, worst


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
            pixel_device = inputs["pixel_values"].device
            clean, scored = _correctness(model, family, inputs, inputs["pixel_values"])
            total += int(scored.sum())
            clean_right += int(clean.sum())

            zero, _ = _attack_batch(model, family, inputs, pixel_box, zero_budget, [None])
            zero_right += int(zero.sum())
            zero_mismatches += int((zero.ne(clean) & scored).sum())
            for key in keys:
                if key not in budgets:  # epsilon 0
                    robust_right[key] += int((clean & zero).sum())
                    continue
                streams = generators.for_restarts(key, restarts, pixel_device)
                survived, _ = _attack_batch(model, family, inputs, pixel_box, budgets[key], streams)
                robust_right[key] += int((clean & survived).sum())
            if weaker_budget is not None:
                # the same random starts as the full attack, so the number of steps is the only difference
                streams = generators.for_restarts(f"weaker {largest}", restarts, pixel_device)
                survived, _ = _attack_batch(model, family, inputs, pixel_box, weaker_budget, streams)
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


# ----------------------------------------------------------------------------------------------------------------
# Dual encoders: zero-shot classification and retrieval
# ----------------------------------------------------------------------------------------------------------------


def _require_dual_encoder(model: nn.Module, what: str) -> None:
    family = detect_family(model)
    if not isinstance(family, DualEncoderFamily):
        raise ValueError(f"{what} needs a dual encoder (CLIP / SigLIP style); this model is a {family.name}.")


def _embedding_tensor(output: Any, method: str) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose `pooler_output` is the projected embedding
    if torch.is_tensor(output):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if torch.is_tensor(value):
            return value
    raise ValueError(f"`{method}` returned a {type(output).__name__} without an embedding tensor.")


def _has_feature_methods(base: nn.Module) -> bool:
    return callable(getattr(base, "get_image_features", None)) and callable(
        getattr(base, "get_text_features", None)
    )


def _image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    base = unwrap_model(model)
    embeddings = _embedding_tensor(base.get_image_features(pixel_values=pixel_values), "get_image_features")
    return F.normalize(embeddings.float(), dim=-1)


def _text_embeddings(model: nn.Module, text_inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    base = unwrap_model(model)
    embeddings = _embedding_tensor(base.get_text_features(**text_inputs), "get_text_features")
    return F.normalize(embeddings.float(), dim=-1)


def zero_shot_accuracy(
    model: nn.Module, batches: Iterable[Batch], class_text_inputs: Mapping[str, torch.Tensor]
) -> float:
    """Prompt-based zero-shot accuracy of a dual encoder: each image gets the class whose prompt embedding is
    the most similar (the argmax of `logits_per_image`, whose scale and bias do not change the order).

    The class prompts are embedded once; a model without `get_image_features` / `get_text_features` is scored
    through its forward pass instead.
    """
    _require_dual_encoder(model, "zero_shot_accuracy")
    if class_text_inputs is None or "input_ids" not in class_text_inputs:
        raise ValueError(
            "zero_shot_accuracy needs `class_text_inputs` with `input_ids` (one prompt per class)."
        )
    if not _has_feature_methods(unwrap_model(model)):
        return clean_accuracy(model, batches, class_text_inputs=class_text_inputs)
    device = _model_device(model)
    right = total = 0
    with _evaluation_mode(model), torch.no_grad():
        classes = _text_embeddings(model, {key: value.to(device) for key, value in class_text_inputs.items()})
        for batch in batches:
            inputs = _to_device(batch, device)
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError("zero_shot_accuracy needs `labels` (class indices) in every batch.")
            predicted = (_image_embeddings(model, inputs["pixel_values"]) @ classes.T).argmax(-1)
            scored = labels.ne(-100)
            right += int((predicted.eq(labels) & scored).sum())
            total += int(scored.sum())
    if total == 0:
        raise ValueError("no sample could be scored: the batches were empty or every label was -100.")
    return right / total


@torch.no_grad()
def image_features(model: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """L2-normalised image embeddings of a dual encoder (the adapter, if any, active) for every batch, in eval mode."""
    _require_dual_encoder(model, "image_features")
    device = _model_device(model)
    with _evaluation_mode(model):
        chunks = [_image_embeddings(model, batch["pixel_values"].to(device)) for batch in batches]
    if not chunks:
        raise ValueError("image_features got no batches.")
    return torch.cat(chunks).cpu()


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-3,
    iterations: int = 200,
) -> float:
    """Accuracy of a multinomial logistic regression fit on frozen features (L-BFGS from zeros: deterministic).

    How much of a task the features already hold: the "transfer" measure of the noise study, and the difficulty
    of a task for a given backbone.
    """
    if len(train_features) != len(train_labels) or len(eval_features) != len(eval_labels):
        raise ValueError(
            f"features and labels must pair up: train {len(train_features)} vs {len(train_labels)}, "
            f"eval {len(eval_features)} vs {len(eval_labels)}."
        )
    mean = train_features.mean(0, keepdim=True)
    scale = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train, x_eval = (train_features - mean) / scale, (eval_features - mean) / scale
    classes = int(max(train_labels.max(), eval_labels.max())) + 1
    linear = nn.Linear(x_train.shape[1], classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), train_labels) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(linear(x_eval).argmax(-1).eq(eval_labels).float().mean())


def retrieval_recall_at_k(
    model: nn.Module, batches: Iterable[Batch], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k of a dual encoder over the whole evaluation set.

    Every batch holds image-caption pairs (`pixel_values` and `input_ids`, row i captions image i); the
    embeddings of all batches are gathered, then each image ranks all captions and each caption all images.
    A pair is found at k when fewer than k others score at least as high (ties count against the model).
    Keys: `image_to_text_recall@k` and `text_to_image_recall@k`.
    """
    _require_dual_encoder(model, "retrieval_recall_at_k")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}.")
    device = _model_device(model)
    base = unwrap_model(model)
    images, texts = [], []
    with _evaluation_mode(model), torch.no_grad():
        for batch in batches:
            inputs = _to_device(batch, device)
            if "input_ids" not in inputs or "pixel_values" not in inputs:
                raise ValueError(
                    f"retrieval needs `pixel_values` and `input_ids` in every batch, got {sorted(inputs)}."
                )
            text_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
            if _has_feature_methods(base):
                images.append(_image_embeddings(model, inputs["pixel_values"]))
                texts.append(_text_embeddings(model, text_inputs))
            else:
                outputs = model(pixel_values=inputs["pixel_values"], **text_inputs)
                images.append(F.normalize(_embedding_tensor(outputs.image_embeds, "forward").float(), dim=-1))
                texts.append(F.normalize(_embedding_tensor(outputs.text_embeds, "forward").float(), dim=-1))
    if not images:
        raise ValueError("retrieval_recall_at_k got no batches.")
    image_embeddings, text_embeddings = torch.cat(images), torch.cat(texts)
    if image_embeddings.shape[0] != text_embeddings.shape[0]:
        raise ValueError(
            f"{image_embeddings.shape[0]} images but {text_embeddings.shape[0]} captions: retrieval needs one caption "
            "per image."
        )
    similarity = image_embeddings @ text_embeddings.T
    matching = similarity.diagonal()
    others = ~torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    image_rank = ((similarity >= matching[:, None]) & others).sum(
        dim=1
    )  # captions at least as close as its own
    text_rank = ((similarity >= matching[None, :]) & others).sum(dim=0)  # images at least as close as its own
    recalls = {}
    for k in ks:
        recalls[f"image_to_text_recall@{k}"] = image_rank.lt(k).float().mean().item()
        recalls[f"text_to_image_recall@{k}"] = text_rank.lt(k).float().mean().item()
    return recalls


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
    and normalisation; `to_pixels` is its inverse). Prompt-classifying dual encoders give the image-to-prompt
    logits. The wrapper never changes the model's train/eval modes (torchattacks calls `eval()`/`train()` on it):
    the evaluation sets them once with `attack_mode`, which keeps the flags some layers need.
    """

    def __init__(self, model: nn.Module, family: ModelFamily, pixel_box: PixelBox, dtype: torch.dtype):
        super().__init__()
        if isinstance(family, GenerativeFamily):
            raise ValueError(
                "AutoAttack scores class predictions; a generative VLM's answers are token sequences. "
                "Use evaluate_robust_accuracy, which runs PGD on the answer-token loss for them."
            )
        if isinstance(family, DualEncoderFamily) and family.class_text_inputs is None:
            raise ValueError(
                "AutoAttack on a dual encoder needs `class_text_inputs` (one tokenised prompt per class): without "
                "them there are no class logits, only in-batch retrieval, which depends on the whole batch."
            )
        self.model = model
        self.family = family
        self.pixel_box = pixel_box
        self.dtype = dtype

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
) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
    """Run `attacks` in turn, each on the samples still robust; a sample is robust if no attack fooled it.

    `robust` (bool `[N]`) says which samples start robust (the clean-correct ones). Every adversarial example is
    projected on the budget and the pixel box and scored by a fresh forward pass, so a sample counts as fooled only
    by an input inside the threat model. Returns the final robust mask and, per attack, how many samples it fooled,
    how many stayed robust after it, and the largest L-inf perturbation it returned (pixel units, before the guard).
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
        per_attack[name] = {
            "fooled": fooled_count,
            "robust_after": int(robust.sum()),
            "max_perturbation": largest,
        }
    return robust, per_attack


def evaluate_autoattack(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    pixel_box: PixelBox,
    epsilons: Sequence[float | str] = (1 / 255, 2 / 255, 4 / 255),
    version: str | AutoAttackSettings = "standard",
    class_text_inputs: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    tolerance: float = 0.01,
    large_budget_tolerance: float = 0.05,
) -> RobustnessReport:
    """Clean accuracy and AutoAttack robust accuracy (per-sample worst case) of a class-prediction model.

    `version="standard"` runs AutoAttack's standard set (APGD-CE, APGD-T, FAB-T, Square, from torchattacks) at each
    L-inf budget of `epsilons` ([0, 1] pixel units; `pixel_box` converts them); `version="quick"` the same attacks
    with fewer iterations (reported as `AutoAttack-quick`). A sample is robust at a budget if it is right on the
    clean input and no attack fooled it. `report.attack["per_attack"]` holds, per budget and attack, the accuracy
    left after it. Classifiers and prompt-classifying dual encoders (`class_text_inputs`) only.

    Budgets run from the smallest up, each on the samples the smaller one left (a sample fooled inside a small ball
    is fooled inside every larger one), so accuracy cannot rise with the budget. Gradient-masking checks (warned with
    `GradientMaskingWarning`, recorded in `report.checks`): the black-box Square fools no more than `tolerance` of the samples the white-box attacks
    left; APGD-CE at `settings.large_epsilon` (32/255) leaves at most `large_budget_tolerance` accurate. The random
    state of the caller is restored afterwards (torchattacks seeds torch's global generator).
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
    device = _model_device(model)
    total = clean_right = large_right = 0
    robust_right = dict.fromkeys(keys, 0)
    per_attack: dict[str, dict[str, dict[str, float]]] = {key: {} for key in keys}
    classes = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _evaluation_mode(model):
        for batch in batches:
            inputs = _to_device(batch, device)
            family.check_inputs(inputs)
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError("AutoAttack needs `labels` (class indices) in every batch.")
            classifier = PixelSpaceClassifier(model, family, pixel_box, inputs["pixel_values"].dtype)
            pixels = classifier.to_pixels(inputs["pixel_values"]).clamp(0.0, 1.0)
            scored = labels.ne(-100)
            pixels, labels = pixels[scored], labels[scored]
            if labels.numel() == 0:
                continue
            with torch.no_grad():
                logits = classifier(pixels)
            classes = logits.shape[-1]
            if classes < 4:
                raise ValueError(
                    f"AutoAttack's targeted attacks need at least 4 classes (their DLR loss reads the 4th logit); "
                    f"this model has {classes}. Use evaluate_robustness (PGD) instead."
                )
            clean = logits.argmax(-1).eq(labels)
            total += labels.numel()
            clean_right += int(clean.sum())
            # Budgets from the smallest up: a sample fooled at a smaller budget is fooled at every larger one (its
            # adversarial example lies inside the larger ball too), so only the survivors are attacked again.
            robust = clean
            for key in keys:
                attacks = _autoattack_steps(settings, values[key], classes, seed)
                robust, counts = autoattack_cascade(classifier, pixels, labels, robust, values[key], attacks)
                robust_right[key] += int(robust.sum())
                for name, numbers in counts.items():
                    entry = per_attack[key].setdefault(
                        name, {"fooled": 0, "robust_after": 0, "max_perturbation": 0.0}
                    )
                    entry["fooled"] += numbers["fooled"]
                    entry["robust_after"] += numbers["robust_after"]
                    entry["max_perturbation"] = max(entry["max_perturbation"], numbers["max_perturbation"])
            large_settings = replace(settings, apgd_steps=settings.large_steps)
            large = _autoattack_steps(large_settings, settings.large_epsilon, classes, seed)[:1]
            survived, _ = autoattack_cascade(classifier, pixels, labels, clean, settings.large_epsilon, large)
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
    attack_info = {
        "name": settings.name,
        "description": settings.describe(classes),
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
    return RobustnessReport(clean_right / total, robust_accuracy, attack_info, total, checks)


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
    """The robust accuracy to report: AutoAttack (or AutoAttack-quick) for class predictions; for generative VLMs,
    whose answers AutoAttack cannot score, PGD-100 with 3 restarts on the answer-token loss (PGD-50, 2 restarts,
    when `quick`), labelled with what it is.
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
