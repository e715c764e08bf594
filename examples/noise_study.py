"""The paper's noise study in miniature, offline on CPU: how the share of adversarial noise in the upstream
(pre-training) data changes clean accuracy, robust accuracy and transfer after LoRA and RAN fine-tuning.

For each noise ratio (default 0, 5, 10, 20, 30, 50 %):

1. noisy upstream data: the synthetic image-caption upstream set with `round(ratio * n)` rows attacked by
   `add_adversarial_noise` (default mode "both": targeted PGD on the image and a medical-term swap in the caption).
   The image attack's surrogate is a small CLIP pre-trained once on the *clean* upstream data. Pre-training on the
   clean data with the same steps and seed is exactly the ratio-0 upstream model, so that run is reused for ratio 0;
2. upstream model: a small CLIP pre-trained contrastively from scratch on the noisy data (same steps and seed for
   every ratio, so the noise is the only difference);
3. downstream: LoRA and RAN adapters (the default `RANConfig`; LoRA is `lora_equivalent` of it) fine-tuned on the
   main task (`--task`, default "anatomy") and measured clean and under PGD (`--eval-attack-steps`, default 10,
   at least as strong as RAN's one-step training attack) at each `--eval-epsilons` budget;
4. transfer to a second task (`--transfer-task`, default "modality"): a linear probe (multinomial logistic
   regression) on the frozen, L2-normalised image embeddings, for the upstream model and for the LoRA and RAN
   fine-tuned models. A probe is cheap (forward passes and a tiny convex fit, no fine-tuning) and measures what the
   paper's "transferability" is about: how much of a new task the learned features already hold.

Writes a JSON report (`--out`) with every number and the time of each phase, and a PNG plot beside it; prints a
summary table and a finding computed from the numbers. Nothing is cached: scratch files go to a temporary folder
(or `--work-dir`). The synthetic data and small models stand in for real ones: the study shows the method, and its
numbers say nothing about real medical VLMs.

    python examples/noise_study.py --quick          # under a minute (49 s measured, idle 2 cores)
    python examples/noise_study.py                  # 8 minutes measured on a 2-core machine running another job
    python examples/noise_study.py --ratios 0,0.1,0.5 --out runs/noise.json

It runs on one thread (`--threads`): on a shared machine two threads spin-waiting for each other are several times
slower than one; on free cores `--threads 2` is faster.
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of non-4-bit runs)

# isort: split

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ran_peft.evaluation import parse_epsilon

logger = logging.getLogger("ran_peft.noise_study")

METHODS = ("lora", "ran")
LABELS = {"lora": "LoRA", "ran": "RAN"}


@dataclass
class StudySettings:
    """Every size and knob of the study; the defaults are the full study, `QUICK` the smoke-sized one."""

    ratios: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    noise_mode: str = "both"
    noise_epsilon: float = 8 / 255
    noise_steps: int = 10
    image_size: int = 32
    upstream_size: int = 1024
    pretrain_steps: int = 120
    pretrain_batch_size: int = 64
    task: str = "anatomy"
    transfer_task: str = "modality"
    train_size: int = 512
    eval_size: int = 160
    finetune_steps: int = 40
    batch_size: int = 32
    learning_rate: float = 2e-3
    eval_epsilons: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)
    eval_attack_steps: int = 10
    eval_restarts: int = 1
    transfer_train_size: int = 384
    transfer_eval_size: int = 160
    seed: int = 0
    threads: int = 1
    progress: bool = True


QUICK = dict(
    ratios=(0.0, 0.2),
    image_size=32,
    upstream_size=160,
    pretrain_steps=40,
    pretrain_batch_size=32,
    train_size=128,
    eval_size=64,
    finetune_steps=12,
    batch_size=16,
    transfer_train_size=128,
    transfer_eval_size=64,
)


class UsageError(ValueError):
    """A bad argument: reported as one line, before anything runs."""


def check_settings(settings: StudySettings) -> None:
    from ran_peft.data import SYNTHETIC_TASKS
    from ran_peft.noise import NOISE_MODES

    if not settings.ratios or any(not 0.0 <= r <= 1.0 for r in settings.ratios):
        raise UsageError(f"--ratios={list(settings.ratios)}: give one or more ratios in [0, 1].")
    if len(set(settings.ratios)) != len(settings.ratios):
        raise UsageError(f"--ratios={list(settings.ratios)} repeats a ratio.")
    if settings.noise_mode not in NOISE_MODES:
        raise UsageError(f"--noise-mode={settings.noise_mode!r} must be one of {NOISE_MODES}.")
    for name in ("task", "transfer_task"):
        if getattr(settings, name) not in SYNTHETIC_TASKS:
            raise UsageError(
                f"--{name.replace('_', '-')}={getattr(settings, name)!r} must be one of {sorted(SYNTHETIC_TASKS)}."
            )
    if settings.image_size < 16 or settings.image_size % 8:
        raise UsageError(
            f"--image-size={settings.image_size} must be a multiple of 8 (the patch size), >= 16."
        )
    if settings.upstream_size < 2:
        raise UsageError(
            f"--upstream-size={settings.upstream_size} must be >= 2 (the image attack needs two rows)."
        )
    for name in (
        "pretrain_steps",
        "pretrain_batch_size",
        "train_size",
        "eval_size",
        "finetune_steps",
        "batch_size",
        "eval_attack_steps",
        "eval_restarts",
        "transfer_train_size",
        "transfer_eval_size",
        "threads",
    ):
        if getattr(settings, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(settings, name)} must be >= 1.")
    if settings.pretrain_batch_size > settings.upstream_size:
        # pretrain_clip drops the last partial batch: a batch larger than the data would never yield one.
        raise UsageError(
            f"--pretrain-batch-size={settings.pretrain_batch_size} is larger than --upstream-size="
            f"{settings.upstream_size}."
        )
    if not 0.0 <= settings.noise_epsilon <= 1.0 or settings.noise_steps < 0:
        raise UsageError("--noise-epsilon must be in [0, 1] and --noise-steps >= 0.")
    if not settings.eval_epsilons or any(not 0.0 < e <= 1.0 for e in settings.eval_epsilons):
        raise UsageError(f"--eval-epsilons={list(settings.eval_epsilons)}: every budget must be in (0, 1].")


# ----------------------------------------------------------------------------------------------------------------
# Timing, features and the linear probe
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------


def run_study(
    settings: StudySettings, out: str | os.PathLike, *, work_dir: str | os.PathLike | None = None
) -> dict:
    """Run the whole study, write `out` (JSON) and its PNG plot, and return the report."""
    import datasets

    from ran_peft import PixelBox, RANConfig
    from ran_peft.data import ImageTextCollator, synthetic_medical_dataset, tokenize_class_prompts
    from ran_peft.experiments import ExperimentSettings, evaluate_adapter, lora_equivalent, train_adapter
    from ran_peft.noise import SurrogateVLM, add_adversarial_noise
    from ran_peft.pretrain import offline_processor, pretrain_clip
    from ran_peft.representation import image_features, linear_probe_accuracy

    check_settings(settings)
    torch.set_num_threads(settings.threads)
    bars_were_on = datasets.is_progress_bar_enabled()
    if not settings.progress:
        datasets.disable_progress_bars()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    own_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ran-noise-study-")) if own_work_dir else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, Any] = {}
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "design": {
            "surrogate": "a small CLIP pre-trained once on the clean upstream data (same steps and seed as every "
            "upstream model); it is also the ratio-0 upstream model",
            "upstream_model": "small CLIP pre-trained contrastively from scratch on the (noisy) upstream data",
            "methods": {
                "lora": "lora_equivalent(RANConfig(...)): every RAN term off",
                "ran": "RANConfig defaults",
            },
            "robust_accuracy": f"PGD-{settings.eval_attack_steps} with {settings.eval_restarts} restart(s), "
            "L-inf, per budget",
            "transfer": f"linear-probe accuracy on task {settings.transfer_task!r} from frozen, L2-normalised image "
            "embeddings (multinomial logistic regression, L-BFGS): of the upstream model and of the LoRA and RAN "
            f"models fine-tuned on {settings.task!r}",
        },
        "results": [],
        "timings_seconds": timings,
    }
    try:
        with timed(timings, "data"):
            processor = offline_processor(image_size=settings.image_size)
            size = settings.image_size
            upstream = synthetic_medical_dataset(
                settings.upstream_size, seed=settings.seed, image_size=size, split_name="upstream"
            )
            train = synthetic_medical_dataset(
                settings.train_size,
                seed=settings.seed,
                image_size=size,
                task=settings.task,
                split_name="train",
            )
            evaluation = synthetic_medical_dataset(
                settings.eval_size, seed=settings.seed, image_size=size, task=settings.task, split_name="test"
            )
            transfer_train = synthetic_medical_dataset(
                settings.transfer_train_size,
                seed=settings.seed,
                image_size=size,
                task=settings.transfer_task,
                split_name="transfer_train",
            )
            transfer_eval = synthetic_medical_dataset(
                settings.transfer_eval_size,
                seed=settings.seed,
                image_size=size,
                task=settings.transfer_task,
                split_name="transfer_test",
            )
        collator = ImageTextCollator(processor.image_processor, processor.tokenizer, mode="classification")
        class_text_inputs = tokenize_class_prompts(processor.tokenizer, train.features["label"].names)
        pixel_box = PixelBox.from_processor(processor)
        ran_config = RANConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            image_mean=list(pixel_box.mean),
            image_std=list(pixel_box.std),
        )
        configs = {"lora": lora_equivalent(ran_config), "ran": ran_config}
        report["design"]["ran_recipe"] = ran_config.recipe_dict()
        experiment = ExperimentSettings(
            max_steps=settings.finetune_steps,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            eval_epsilons=settings.eval_epsilons,
            eval_attack_steps=settings.eval_attack_steps,
            eval_restarts=settings.eval_restarts,
            progress=settings.progress,
            logging_steps=settings.finetune_steps,  # one log line per run keeps the console readable
        )
        transfer_labels = (
            torch.tensor(transfer_train["label"]),
            torch.tensor(transfer_eval["label"]),
        )

        def transfer_accuracy(model: torch.nn.Module) -> float:
            def features(rows: Any) -> torch.Tensor:
                return image_features(
                    model, torch.utils.data.DataLoader(rows, batch_size=64, collate_fn=collator)
                )

            return linear_probe_accuracy(
                features(transfer_train), transfer_labels[0], features(transfer_eval), transfer_labels[1]
            )

        pretrain = dict(
            steps=settings.pretrain_steps,
            batch_size=settings.pretrain_batch_size,
            seed=settings.seed,
            image_size=size,
            progress=settings.progress,
        )
        with timed(timings, "surrogate_pretraining"):
            surrogate_model = pretrain_clip(upstream, processor, **pretrain)
        surrogate = SurrogateVLM(surrogate_model, processor.image_processor, processor.tokenizer)

        per_ratio: dict[str, dict[str, float]] = {}
        timings["per_ratio"] = per_ratio
        for ratio in settings.ratios:
            phase: dict[str, float] = {}
            per_ratio[f"{ratio:g}"] = phase
            print(f"\n=== noise ratio {100 * ratio:g}% ===", flush=True)
            with timed(phase, "noise"):
                noisy = add_adversarial_noise(
                    upstream,
                    ratio,
                    mode=settings.noise_mode,
                    seed=settings.seed,
                    surrogate=surrogate,
                    epsilon=settings.noise_epsilon,
                    steps=settings.noise_steps,
                )
            noisy_rows = int(sum(noisy["noisy"]))
            with timed(phase, "pretraining"):
                # Same data, steps and seed as the surrogate's run: reuse it rather than train it twice.
                upstream_model = (
                    surrogate_model if noisy_rows == 0 else pretrain_clip(noisy, processor, **pretrain)
                )
            with timed(phase, "transfer_upstream"):
                transfer = {"task": settings.transfer_task, "upstream": transfer_accuracy(upstream_model)}
            entry: dict[str, Any] = {
                "ratio": ratio,
                "noisy_rows": noisy_rows,
                "upstream_rows": len(noisy),
                "noisy_fraction": noisy_rows / len(noisy),
            }
            for method in METHODS:
                # get_peft_model injects the adapter in place: each run gets its own copy of the upstream model.
                base = copy.deepcopy(upstream_model)
                with timed(phase, f"{method}_train"):
                    _, model, _ = train_adapter(
                        base,
                        configs[method],
                        train,
                        collator,
                        processor.image_processor,
                        experiment,
                        work / f"{method}-{ratio:g}",
                        class_text_inputs=class_text_inputs,
                    )
                with timed(phase, f"{method}_eval"):
                    measured = evaluate_adapter(
                        model,
                        evaluation,
                        collator,
                        pixel_box,
                        experiment,
                        class_text_inputs=class_text_inputs,
                    )
                measured["train_seconds"] = phase[f"{method}_train"]
                entry[method] = measured
                with timed(phase, f"transfer_{method}"):
                    transfer[method] = transfer_accuracy(model)
                del model, base
            entry["transfer"] = transfer
            report["results"].append(entry)
            print(ratio_line(entry), flush=True)
            _write_json(report, out)  # a partial study still leaves its numbers behind
        report["finding"] = finding(report)
        with timed(timings, "plot"):
            plot(report, out.with_suffix(".png"))
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    timings["total"] = round(time.perf_counter() - started, 3)
    _write_json(report, out)
    print()
    print(table(report))
    print()
    print(report["finding"])
    print(f"\nreport: {out}  plot: {out.with_suffix('.png')}  ({timings['total']:.0f} s)")
    return report


def _write_json(report: dict, path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(report, indent=2))
    os.replace(staging, path)


# ----------------------------------------------------------------------------------------------------------------
# Reporting: table, plot and the finding
# ----------------------------------------------------------------------------------------------------------------


def mean_robust(run: dict) -> float:
    values = list(run["robust_accuracy"].values())
    return sum(values) / len(values)


def ratio_line(entry: dict) -> str:
    parts = [f"ratio {100 * entry['ratio']:g}% ({entry['noisy_rows']} noisy rows):"]
    for method in METHODS:
        run = entry[method]
        parts.append(
            f"{method} clean {100 * run['clean_accuracy']:.1f} robust(mean) {100 * mean_robust(run):.1f};"
        )
    transfer = entry["transfer"]
    parts.append(
        f"transfer ({transfer['task']}) upstream {100 * transfer['upstream']:.1f} "
        f"lora {100 * transfer['lora']:.1f} ran {100 * transfer['ran']:.1f}"
    )
    return " ".join(parts)


def table(report: dict) -> str:
    results = report["results"]
    budgets = list(results[0]["lora"]["robust_accuracy"])
    header = f"{'noise':>6} {'method':<6} {'clean':>6} " + " ".join(f"{'@' + b:>8}" for b in budgets)
    header += f" {'transfer':>9}"
    lines = [header, "-" * len(header)]
    for entry in results:
        for method in METHODS:
            run = entry[method]
            cells = " ".join(f"{100 * run['robust_accuracy'][b]:8.1f}" for b in budgets)
            lines.append(
                f"{100 * entry['ratio']:5g}% {method:<6} {100 * run['clean_accuracy']:6.1f} {cells} "
                f"{100 * entry['transfer'][method]:9.1f}"
            )
        lines.append(
            f"{100 * entry['ratio']:5g}% {'(upstream probe)':<{7 + 7 + 9 * len(budgets)}}"
            f"{100 * entry['transfer']['upstream']:9.1f}"
        )
    transfer_task = results[0]["transfer"]["task"]
    lines.append(
        f"accuracy in %; robust = PGD at each budget; transfer = linear probe on {transfer_task!r} (frozen features)"
    )
    return "\n".join(lines)


def _describe_curve(
    name: str, ratios: Sequence[float], values: Sequence[float], margin: float
) -> tuple[str, str]:
    """A sentence on one accuracy-vs-noise curve, and its verdict: "peak" (rises, then falls), "rise", "fall",
    "flat" or "mixed", with changes under `margin` (two standard errors) counted as no change."""
    clean_value = values[0]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    gain = values[best] - clean_value
    drop = values[best] - values[-1]
    text = (
        f"{name} goes {', '.join(f'{100 * v:.1f}' for v in values)}% over noise "
        f"{', '.join(f'{100 * r:g}' for r in ratios)}%"
    )
    if len(values) < 2:
        return text + ".", "flat"
    rises = best > 0 and gain > margin
    falls_after = best < len(values) - 1 and drop > margin
    if rises and falls_after:
        verdict = "peak"
        text += (
            f": best at {100 * ratios[best]:g}% noise (+{100 * gain:.1f} points over clean data), then down "
        )
        text += f"{100 * drop:.1f} points at {100 * ratios[-1]:g}%."
    elif rises:
        verdict = "rise"
        text += f": up {100 * gain:.1f} points at {100 * ratios[best]:g}% noise and not down again after it."
    elif values[-1] < clean_value - margin:
        verdict = "fall"
        text += (
            f": down {100 * (clean_value - values[-1]):.1f} points from clean data to {100 * ratios[-1]:g}%."
        )
    elif max(values) - min(values) <= margin:
        verdict = "flat"
        text += f": every change is within the noise of the measurement (+-{100 * margin:.1f} points)."
    else:
        verdict = "mixed"
        text += f": no clear trend beyond +-{100 * margin:.1f} points."
    return text, verdict


def finding(report: dict) -> str:
    """One paragraph on what the numbers show, set against the paper's claim (moderate noise helps robustness and
    transfer, more noise hurts). Differences below two binomial standard errors count as no difference."""
    results = sorted(report["results"], key=lambda entry: entry["ratio"])
    ratios = [entry["ratio"] for entry in results]
    n_eval = results[0]["lora"]["num_samples"]
    n_transfer = report["settings"]["transfer_eval_size"]

    def margin(values: Sequence[float], n: int) -> float:
        p = min(max(sum(values) / len(values), 1 / n), 1 - 1 / n)
        return 2 * math.sqrt(p * (1 - p) / n)

    sentences, verdicts = [], {}
    for method in METHODS:
        values = [mean_robust(entry[method]) for entry in results]
        text, verdicts[LABELS[method]] = _describe_curve(
            f"{LABELS[method]} robust accuracy (mean over budgets)", ratios, values, margin(values, n_eval)
        )
        sentences.append(text)
    clean = {method: [entry[method]["clean_accuracy"] for entry in results] for method in METHODS}
    transfer = [entry["transfer"]["upstream"] for entry in results]
    text, verdicts["transfer"] = _describe_curve(
        "Transfer (upstream linear probe)", ratios, transfer, margin(transfer, n_transfer)
    )
    sentences.append(text)
    gap_robust = sum(mean_robust(e["ran"]) - mean_robust(e["lora"]) for e in results) / len(results)
    gap_clean = sum(c_ran - c_lora for c_ran, c_lora in zip(clean["ran"], clean["lora"], strict=True)) / len(
        results
    )
    sentences.append(
        f"Averaged over noise levels RAN is {100 * gap_robust:+.1f} points robust and {100 * gap_clean:+.1f} points "
        f"clean against LoRA ({n_eval} test rows, so about +-{100 * margin(clean['lora'], n_eval):.1f} points is "
        "within noise)."
    )
    supported = [name for name, verdict in verdicts.items() if verdict == "peak"]
    if len(ratios) < 3:
        claim = "With fewer than three noise levels a rise-then-fall cannot be seen, so the paper's claim is not tested."
    elif supported:
        claim = (
            f"The rise-then-fall the paper reports (moderate noise helps, more noise hurts) shows in: "
            f"{', '.join(supported)}; not in: {', '.join(n for n in verdicts if n not in supported) or 'none'}."
        )
    else:
        claim = (
            "None of these curves shows the paper's rise-then-fall (moderate noise helps, more noise hurts) beyond the "
            "noise of the measurement; at this size the claim is not reproduced."
        )
    sentences.append(claim)
    sentences.append(
        "Synthetic data and tiny models: these numbers illustrate the method, not real medical VLMs."
    )
    return " ".join(sentences)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(report["results"], key=lambda entry: entry["ratio"])
    ratios = [100 * entry["ratio"] for entry in results]
    budgets = list(results[0]["lora"]["robust_accuracy"])
    colours = {"lora": "tab:blue", "ran": "tab:orange", "upstream": "tab:green"}
    styles = ["--", "-.", ":", (0, (1, 3)), (0, (5, 1))]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        left.plot(
            ratios,
            [100 * e[method]["clean_accuracy"] for e in results],
            marker="o",
            color=colours[method],
            label=f"{LABELS[method]} clean",
        )
        for index, budget in enumerate(budgets):
            left.plot(
                ratios,
                [100 * e[method]["robust_accuracy"][budget] for e in results],
                marker=".",
                linestyle=styles[index % len(styles)],
                color=colours[method],
                label=f"{LABELS[method]} PGD {budget}",
            )
    left.set_title(f"Downstream task '{report['settings']['task']}'")
    transfer_task = results[0]["transfer"]["task"]
    for name in ("upstream", *METHODS):
        right.plot(
            ratios,
            [100 * e["transfer"][name] for e in results],
            marker="o",
            color=colours[name],
            label={"upstream": "upstream model"}.get(name, f"{LABELS.get(name)} (fine-tuned)"),
        )
    right.set_title(f"Transfer: linear probe on '{transfer_task}'")
    for axis in (left, right):
        axis.set_xticks(ratios)
        axis.set_xlabel("upstream noise ratio (%)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(parse_epsilon(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers.") from error


def _ratios(text: str) -> tuple[float, ...]:
    # Ratios may be given as fractions or percentages ("0,5%,10%").
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(float(p[:-1]) / 100 if p.endswith("%") else parse_epsilon(p) for p in parts)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ratios.") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and two ratios: under a minute.")
    parser.add_argument("--out", default="noise_study.json", help="JSON report; the PNG plot goes beside it.")
    parser.add_argument(
        "--work-dir", default=None, help="Scratch folder (default: a temporary one, removed)."
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")
    converters = {"ratios": _ratios, "eval_epsilons": _fractions, "noise_epsilon": parse_epsilon}
    for item in fields(StudySettings):
        if item.name == "progress":
            continue
        converter = converters.get(item.name, type(item.default))
        parser.add_argument(
            f"--{item.name.replace('_', '-')}",
            type=converter,
            default=None,
            help=f"default {item.default!r}"
            + (f", --quick {QUICK[item.name]!r}" if item.name in QUICK else ""),
        )
    return parser


def settings_from_arguments(arguments: argparse.Namespace) -> StudySettings:
    """The preset (full or `--quick`), with every option given on the command line on top."""
    settings = replace(StudySettings(), **QUICK) if arguments.quick else StudySettings()
    given = {
        item.name: getattr(arguments, item.name)
        for item in fields(StudySettings)
        if item.name != "progress" and getattr(arguments, item.name) is not None
    }
    return replace(settings, **given, progress=arguments.progress)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    arguments = build_parser().parse_args(argv)
    try:
        settings = settings_from_arguments(arguments)
        run_study(settings, arguments.out, work_dir=arguments.work_dir)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
