"""Clean and AutoAttack robust accuracy of RAN and its peers (LoRA, FGSM-RS fast AT, TeCoA, PMG-AFT, FARE,
TRADES-10, PGD-AT-10), each a RANConfig setting, fine-tuned the same way over several seeds.

Each method starts from the same base weights (reloaded from the model folder), trains the same adapter on the same
synthetic medical-style data for the same steps, for every seed; it is evaluated with AutoAttack (APGD-CE, APGD-T,
FAB-T, Square from torchattacks; `--eval-attack autoattack`, or the `autoattack-quick` variant, named as such) at
each budget, per-sample worst case. Train time is a ratio to LoRA's in the same seed's run, end to end and per
median optimiser step. Writes FILE.json, FILE.md (tables) and FILE.png (clean vs robust, labelled by time ratio).

    python benchmarks/robustness.py --out robustness.json [--quick] [--methods lora,ran] [--seeds 42,43,44] [--jobs 2]

`--jobs N` runs every (method, seed) in a process of its own, N at a time (one torch thread each unless `--threads`
says otherwise), and joins their results as `--merge` does; a run gives the same numbers in a process of its own as
in one process with every method.
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of the output)

# isort: split

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ran_peft import PixelBox, RANConfig
from ran_peft.data import ImageTextCollator, synthetic_medical_dataset, tokenize_class_prompts
from ran_peft.evaluation import format_epsilon
from ran_peft.experiments import (
    ExperimentSettings,
    clip_ran_config,
    evaluate_adapter,
    light_weight_configs,
    peer_configs,
    term_ablation_configs,
    train_adapter,
)

PEERS = ("lora", "ran", "fgsm_rs", "tecoa", "pmg_aft", "fare", "trades", "pgd_at")
LIGHT_WEIGHT = tuple(light_weight_configs(RANConfig()))  # every named light-weight recipe, in its order
# Each term of the default switched off in turn (`benchmarks/ablation.py` has more variants, one seed at a time).
TERM_ABLATIONS = ("ran_no_adversarial_loss", "ran_no_kl", "ran_no_free_start", "ran_no_random_start")
METHODS = PEERS + LIGHT_WEIGHT + TERM_ABLATIONS
BASELINE_ATTACK_STEPS = 10
EVAL_EPSILONS = (1 / 255, 2 / 255, 4 / 255)
EVAL_ATTACKS = ("autoattack", "autoattack-quick", "pgd")
# Sized for the comparison on 2 CPU cores (README, "Robustness"); QUICK is a smoke run of a few minutes.
DEFAULTS = dict(
    steps=150,
    batch_size=32,
    train_size=2000,
    eval_size=200,
    eval_attack_steps=20,
    eval_restarts=1,
    eval_attack="autoattack-quick",
    seeds="42,43,44",
)
QUICK = dict(
    steps=8,
    batch_size=32,
    train_size=256,
    eval_size=32,
    eval_attack_steps=20,
    eval_restarts=1,
    eval_attack="autoattack-quick",
    seeds="42",
)


@dataclass
class Setup:
    """What every method shares: the base model folder, the data, the prompts, the pixel box and the settings."""

    model_folder: str
    processor: Any
    train: Any
    evaluation: Any
    collator: ImageTextCollator
    class_text_inputs: dict[str, torch.Tensor]
    pixel_box: PixelBox
    settings: ExperimentSettings
    task: str
    train_size: int
    eval_size: int


# -- arguments ---------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with `ablation.py`: model, data, training length and the evaluation attack."""
    parser.add_argument(
        "--out", required=True, help="where to write the JSON results (FILE.md, FILE.png beside)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps on little data (a smoke run)")
    parser.add_argument(
        "--model", default=None, help="folder of a CLIP-style model (default: the embedded offline model)"
    )
    parser.add_argument(
        "--task",
        default="anatomy",
        help="synthetic task: anatomy (default), modality, finding (hard), laterality (hard)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"optimiser steps (default {DEFAULTS['steps']})"
    )
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument("--train-size", type=int, default=None, help=f"default {DEFAULTS['train_size']}")
    parser.add_argument("--eval-size", type=int, default=None, help=f"default {DEFAULTS['eval_size']}")
    parser.add_argument(
        "--eval-attack",
        default=None,
        help=f"one of {', '.join(EVAL_ATTACKS)} (default {DEFAULTS['eval_attack']}; pgd is the training tool)",
    )
    parser.add_argument(
        "--eval-attack-steps",
        type=int,
        default=None,
        help=f"PGD steps with --eval-attack pgd (default {DEFAULTS['eval_attack_steps']})",
    )
    parser.add_argument(
        "--eval-restarts", type=int, default=None, help="PGD restarts with --eval-attack pgd (default 1)"
    )
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the data (and of the run when --seeds is not given)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the sizes not given on the command line from QUICK or DEFAULTS."""
    base = QUICK if args.quick else DEFAULTS
    for name, value in base.items():
        if getattr(args, name, None) is None and name != "seeds":
            setattr(args, name, value)
    for name in ("steps", "batch_size", "train_size", "eval_size", "eval_attack_steps", "eval_restarts"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    if args.eval_attack not in EVAL_ATTACKS:
        raise SystemExit(
            f"error: --eval-attack={args.eval_attack!r} must be one of {', '.join(EVAL_ATTACKS)}."
        )
    return args


def load_base(folder: str):
    """A fresh copy of the base weights: every method starts from exactly these."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder)


def default_model_folder(progress: bool) -> str:
    """The embedded default model's folder (built on first use, then reused from the cache)."""
    from ran_peft.pretrain import build_default_model

    return str(build_default_model(progress=progress))


def prepare(args: argparse.Namespace) -> Setup:
    """Build (or find) the base model, make the data and the class prompts, and fix the settings."""
    from transformers import AutoConfig, AutoProcessor

    from ran_peft.data import SYNTHETIC_TASKS

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model
    if folder is None:
        print("base model: the embedded default (built on first use, then cached)", flush=True)
        folder = default_model_folder(progress=not args.no_progress)
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --model={folder!r} is not a folder.")
    if args.task not in SYNTHETIC_TASKS:
        raise SystemExit(f"error: --task={args.task!r} must be one of {sorted(SYNTHETIC_TASKS)}.")
    processor = AutoProcessor.from_pretrained(folder)
    image_size = AutoConfig.from_pretrained(folder).vision_config.image_size
    train = synthetic_medical_dataset(
        args.train_size, seed=args.seed, image_size=image_size, task=args.task, split_name="train"
    )
    evaluation = synthetic_medical_dataset(
        args.eval_size, seed=args.seed, image_size=image_size, task=args.task, split_name="test"
    )
    settings = ExperimentSettings(
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        eval_epsilons=EVAL_EPSILONS,
        eval_attack_steps=args.eval_attack_steps,
        eval_restarts=args.eval_restarts,
        eval_attack=args.eval_attack,
        progress=not args.no_progress,
    )
    return Setup(
        model_folder=folder,
        processor=processor,
        train=train,
        evaluation=evaluation,
        collator=ImageTextCollator(processor.image_processor, processor.tokenizer, mode="classification"),
        class_text_inputs=tokenize_class_prompts(processor.tokenizer, train.features["label"].names),
        pixel_box=PixelBox.from_processor(processor),
        settings=settings,
        task=args.task,
        train_size=args.train_size,
        eval_size=args.eval_size,
    )


def check_evaluation_is_stronger(setup: Setup, configs: dict[str, RANConfig]) -> None:
    """Robust accuracy must come from an attack stronger than any the models were trained with."""
    if setup.settings.eval_attack != "pgd":
        return  # AutoAttack: 50-100 iteration APGD and more, beyond every training attack here
    strongest = max((c.attack_steps for c in configs.values() if c.attacks), default=0)
    if setup.settings.eval_attack_steps <= strongest:
        raise SystemExit(
            f"error: the evaluation attack (PGD-{setup.settings.eval_attack_steps}) must be stronger than the "
            f"strongest training attack (PGD-{strongest}): raise --eval-attack-steps."
        )


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step (from the Trainer's step begin to its step end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def run_method(setup: Setup, name: str, config: RANConfig, seed: int | None = None) -> dict[str, Any]:
    """Train one adapter from a fresh copy of the base and evaluate it; a JSON-ready record."""
    settings = setup.settings if seed is None else replace(setup.settings, seed=seed)
    label = name if seed is None else f"{name} seed {seed}"
    print(f"[{label}] training {settings.max_steps} steps ...", flush=True)
    work_dir = tempfile.mkdtemp(prefix=f".robustness-{name}-")
    timer = StepTimer()
    timing: dict[str, float] = {}
    try:
        trainer, model, seconds = train_adapter(
            load_base(setup.model_folder),
            config,
            setup.train,
            setup.collator,
            setup.processor.image_processor,
            settings,
            work_dir,
            class_text_inputs=setup.class_text_inputs,
            callbacks=[timer],
            timing=timing,
        )
        print(f"[{label}] trained in {seconds:.1f} s; evaluating ...", flush=True)
        start = time.perf_counter()
        report = evaluate_adapter(
            model,
            setup.evaluation,
            setup.collator,
            setup.pixel_box,
            settings,
            class_text_inputs=setup.class_text_inputs,
            check_steps=True,
        )
        eval_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "seed": settings.seed,
        "clean_acc": report["clean_accuracy"],
        "robust_acc": report["robust_accuracy"],
        "per_attack": {
            key: {attack: numbers["accuracy_after"] for attack, numbers in attacks.items()}
            for key, attacks in report["attack"].get("per_attack", {}).items()
        },
        "train_seconds": seconds,
        "train_cpu_seconds": timing["cpu_seconds"],
        "load_average_after_training": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "step_seconds": seconds / settings.max_steps,
        "median_step_seconds": statistics.median(timer.seconds) if timer.seconds else None,
        "eval_seconds": eval_seconds,
        "eval_samples": report["num_samples"],
        "attack": report["attack"],
        "checks": report["checks"],
        "passed_checks": report["passed_checks"],
        "loss_log": [entry for entry in trainer.state.log_history if "loss" in entry],
        "recipe": config.recipe_dict(),
    }
    robust = "  ".join(f"@{k} {100 * v:5.1f}" for k, v in record["robust_acc"].items())
    print(
        f"[{label}] clean {100 * record['clean_acc']:5.1f}  {robust}  "
        f"(train {seconds:.1f} s, median step {1000 * (record['median_step_seconds'] or 0):.0f} ms, "
        f"eval {eval_seconds:.1f} s)",
        flush=True,
    )
    return record


def library_versions() -> dict[str, str]:
    """The installed releases a figure depends on (a new transformers or peft can move the numbers)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "torchattacks", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def environment(setup: Setup) -> dict[str, Any]:
    """Where and how the numbers were measured."""
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "torch_version": torch.__version__,
        "library_versions": library_versions(),
        "python_version": platform.python_version(),
        "seed": setup.settings.seed,
        "model": setup.model_folder,
        "settings": {
            **{k: v for k, v in asdict(setup.settings).items() if k != "extra_training_arguments"},
            "task": setup.task,
            "train_size": setup.train_size,
            "eval_size": setup.eval_size,
            "eval_epsilons": [format_epsilon(e) for e in setup.settings.eval_epsilons],
            "image_size": setup.train[0]["image"].size[0],
        },
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(results, indent=2, default=str))
    os.replace(temporary, path)


def sibling(path: Path, suffix: str) -> Path:
    """FILE.json -> FILE.md / FILE.png."""
    return path.with_suffix(suffix) if path.suffix == ".json" else path.with_name(path.name + suffix)


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def attack_name(results: dict[str, Any]) -> str:
    """The evaluation attack in words, from a recorded run."""
    for run in _all_runs(results):
        description = run["attack"].get("description")
        if description:
            return description
        attack = run["attack"]
        return (
            f"PGD-{attack['steps']} (L-inf, step 2.5·ε/steps, random start), {attack['restarts']} restart(s) "
            "(the project's training-time attack, not the reported metric)"
        )
    return "no run"


def describe_attack(results: dict[str, Any]) -> str:
    settings = results["settings"]
    threads = results["machine"]["torch_threads"]
    processes = f", {results['jobs']} processes at once (`--jobs`)" if results.get("jobs", 1) > 1 else ""
    return (
        f"Robust accuracy under {attack_name(results)}, on {settings['eval_size']} held-out samples; "
        f"{settings['max_steps']} steps of batch {settings['batch_size']}, task `{settings['task']}`, "
        f"torch {results['torch_version']}, {results['machine']['cpus']} CPUs, {threads} torch "
        f"thread{'' if threads == 1 else 's'} per process{processes}."
    )


def _all_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    if "runs" in results:
        return [run for seeds in results["runs"].values() for run in seeds.values()]
    return list(results.get("methods", results.get("variants", {})).values())


def masking_note(runs: dict[str, dict[str, Any]]) -> str:
    failed = [name for name, run in runs.items() if not run["passed_checks"]]
    if failed:
        return (
            f"**Gradient-masking checks failed for: {', '.join(failed)}**: their robust numbers are suspect."
        )
    return (
        "Gradient-masking checks passed for every row (with AutoAttack: the black-box Square fooled at most 1 % of "
        "the samples the white-box attacks left, and APGD-CE at 32/255 left at most 5 % accurate; accuracy cannot "
        "rise with ε, since each budget's attacks start from the smaller budget's survivors; with PGD: a zero "
        "budget gives the clean predictions, accuracy falls with ε, half the steps never beat the full attack)."
    )


# -- summary over seeds ------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def add_ratios(results: dict[str, Any]) -> None:
    """Train time and median step of every run as a ratio to LoRA's in the same seed's run."""
    runs = results["runs"]
    for seed, lora in runs.get("lora", {}).items():
        for method in runs.values():
            run = method.get(seed)
            if run is None:
                continue
            run["train_time_ratio_to_lora"] = run["train_seconds"] / lora["train_seconds"]
            if run.get("train_cpu_seconds") and lora.get("train_cpu_seconds"):
                run["train_cpu_time_ratio_to_lora"] = run["train_cpu_seconds"] / lora["train_cpu_seconds"]
            if run["median_step_seconds"] and lora["median_step_seconds"]:
                run["median_step_ratio_to_lora"] = run["median_step_seconds"] / lora["median_step_seconds"]


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    summary = {}
    for name, seeds in results["runs"].items():
        runs = list(seeds.values())
        if not runs:
            continue
        keys = list(runs[0]["robust_acc"])
        entry = {
            "seeds": [run["seed"] for run in runs],
            "clean_acc": spread([run["clean_acc"] for run in runs]),
            "robust_acc": {key: spread([run["robust_acc"][key] for run in runs]) for key in keys},
            "per_attack": {
                key: {
                    attack: spread([run["per_attack"][key][attack] for run in runs])
                    for attack in runs[0]["per_attack"].get(key, {})
                }
                for key in keys
            },
            "train_seconds": spread([run["train_seconds"] for run in runs]),
            "passed_checks": all(run["passed_checks"] for run in runs),
        }
        for ratio in (
            "train_time_ratio_to_lora",
            "train_cpu_time_ratio_to_lora",
            "median_step_ratio_to_lora",
        ):
            values = [run[ratio] for run in runs if ratio in run]
            if values:
                entry[ratio] = spread(values)
        summary[name] = entry
    return summary


def end_to_end_over_median_step(summary: dict[str, Any], method: str = "ran") -> float | None:
    """RAN's end-to-end train-time ratio to LoRA over its median-step ratio to LoRA (means over seeds)."""
    entry = summary.get(method, {})
    if "train_time_ratio_to_lora" not in entry or "median_step_ratio_to_lora" not in entry:
        return None
    return entry["train_time_ratio_to_lora"]["mean"] / entry["median_step_ratio_to_lora"]["mean"]


def _cell(stats: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    if stats["n"] == 1:
        return f"{scale * stats['mean']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def robustness_markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    if not summary:
        return "# Robustness\n\nNo run finished.\n"
    first = next(iter(summary.values()))
    keys = list(first["robust_acc"])
    seeds = sorted({seed for entry in summary.values() for seed in entry["seeds"]})
    header = (
        "| method | clean | "
        + " | ".join(f"robust @{k}" for k in keys)
        + " | train time / LoRA | train CPU time / LoRA | median step / LoRA | seeds |"
    )
    lines = [header, "|" + " --- |" * (len(keys) + 6)]
    for name, entry in summary.items():
        cells = " | ".join(_cell(entry["robust_acc"][k]) for k in keys)
        train = (
            _cell(entry["train_time_ratio_to_lora"], 1, 2) if "train_time_ratio_to_lora" in entry else "n/a"
        )
        step = (
            _cell(entry["median_step_ratio_to_lora"], 1, 2) if "median_step_ratio_to_lora" in entry else "n/a"
        )
        cpu = (
            _cell(entry["train_cpu_time_ratio_to_lora"], 1, 2)
            if "train_cpu_time_ratio_to_lora" in entry
            else "n/a"
        )
        lines.append(
            f"| {name} | {_cell(entry['clean_acc'])} | {cells} | {train} | {cpu} | {step} | {len(entry['seeds'])} |"
        )
    largest = keys[-1]
    attacks = list(first["per_attack"].get(largest, {}))
    attack_lines = []
    if attacks:
        attack_lines = [
            "",
            f"Accuracy left after each attack at {largest} (AutoAttack runs them in this order, each on the samples "
            "the earlier ones left; the last column is the reported worst case):",
            "",
            "| method | clean | " + " | ".join(f"after {a}" for a in attacks) + " |",
            "|" + " --- |" * (len(attacks) + 2),
        ]
        for name, entry in summary.items():
            cells = " | ".join(_cell(entry["per_attack"][largest][a]) for a in attacks)
            attack_lines.append(f"| {name} | {_cell(entry['clean_acc'])} | {cells} |")
    seed_keys = [str(seed) for seed in seeds]
    time_lines = [
        "",
        "Train time / LoRA per seed (end to end; in brackets the median step):",
        "",
        "| method | " + " | ".join(f"seed {seed}" for seed in seed_keys) + " |",
        "|" + " --- |" * (len(seed_keys) + 1),
    ]
    for name, seed_runs in results["runs"].items():
        cells = []
        for seed in seed_keys:
            run = seed_runs.get(seed, {})
            if "train_time_ratio_to_lora" in run:
                step = run.get("median_step_ratio_to_lora")
                step_text = f" ({step:.2f})" if step is not None else ""
                cells.append(f"{run['train_time_ratio_to_lora']:.2f}{step_text}")
            else:
                cells.append("n/a")
        time_lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratio = results.get("end_to_end_over_median_step_ratio")
    runs = {
        f"{name} seed {run['seed']}": run
        for name in results["runs"]
        for run in results["runs"][name].values()
    }
    return "\n".join(
        [
            "# Robustness: RAN and its peers, AutoAttack, several seeds",
            "",
            "Accuracy in %, mean ± standard deviation over seeds "
            f"{', '.join(map(str, seeds))}. " + describe_attack(results),
            "",
            *lines,
            *attack_lines,
            *time_lines,
            "",
            "Train time / LoRA: end-to-end `trainer.train()` time over LoRA's in the same seed's run; train CPU "
            "time / LoRA: the same with the CPU time the process spent (`time.process_time`, one torch thread), which "
            "other processes on a shared machine inflate far less; median step / LoRA: the median optimiser step "
            "over LoRA's. "
            + (
                f"RAN's end-to-end ratio over its median-step ratio: {ratio:.2f}."
                if ratio is not None
                else "RAN or LoRA did not run, so the end-to-end over median-step ratio is not defined."
            ),
            "",
            masking_note(runs),
            "",
            *([results["note"], ""] if results.get("note") else []),
        ]
    )


def plot_front(results: dict[str, Any], path: Path) -> None:
    """Clean accuracy against worst-case robust accuracy at the largest budget, one point per method (mean ± std
    over seeds), labelled with the train-time ratio to LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    figure, axis = plt.subplots(figsize=(7, 5))
    # Labels alternate above and below their points, in order of clean accuracy, so neighbours do not overlap.
    order = sorted(summary, key=lambda name: summary[name]["clean_acc"]["mean"])
    offsets = {name: (5, 6) if index % 2 == 0 else (5, -14) for index, name in enumerate(order)}
    for name, entry in summary.items():
        key = list(entry["robust_acc"])[-1]
        clean, robust = entry["clean_acc"], entry["robust_acc"][key]
        axis.errorbar(
            100 * clean["mean"],
            100 * robust["mean"],
            xerr=100 * clean["std"],
            yerr=100 * robust["std"],
            marker="o",
            capsize=3,
            label=name,
        )
        ratio = entry.get("train_time_ratio_to_lora", {}).get("mean")
        text = f"{name} ({ratio:.1f}x)" if ratio is not None else name
        axis.annotate(
            text,
            (100 * clean["mean"], 100 * robust["mean"]),
            textcoords="offset points",
            xytext=offsets[name],
        )
    key = list(next(iter(summary.values()))["robust_acc"])[-1] if summary else "?"
    axis.set_xlabel("clean accuracy (%)")
    axis.set_ylabel(f"robust accuracy @{key} (%), {attack_name(results).split(' (')[0]}")
    axis.set_title("Clean vs robust (label: train time / LoRA)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds={text!r} must be comma-separated integers.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds={text!r} must list at least one seed, each once.")
    return seeds


# -- main ------------------------------------------------------------------------------------------------------


def merge(paths: list[str], out: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result from several runs of this script (e.g. one process per seed or per method): runs and recipes
    joined in the script's method order, summary recomputed, and the fields of `extra` added before anything is
    written."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    skip = ("runs", "summary", "recipes", "elapsed_seconds", "total_seconds")
    results = {key: value for key, value in parts[0].items() if key not in skip}
    runs: dict[str, dict[str, Any]] = {}
    recipes: dict[str, Any] = {}
    for part in parts:
        recipes.update(part.get("recipes", {}))
        for name, seeds in part["runs"].items():
            for seed, run in seeds.items():
                if seed in runs.setdefault(name, {}):
                    raise SystemExit(f"error: --merge: {name} seed {seed} is in more than one file.")
                runs[name][seed] = run
    order = sorted(runs, key=lambda name: METHODS.index(name) if name in METHODS else len(METHODS))
    results["recipes"] = {name: recipes[name] for name in order if name in recipes}
    results["runs"] = {
        name: dict(sorted(runs[name].items(), key=lambda item: int(item[0]))) for name in order
    }
    results["seeds"] = sorted({int(seed) for seeds in runs.values() for seed in seeds})
    results["merged_from"] = [
        {
            "file": str(path),
            "seeds": part["seeds"],
            "methods": list(part["runs"]),
            "total_seconds": part.get("total_seconds"),
        }
        for path, part in zip(paths, parts, strict=True)
    ]
    add_ratios(results)
    results["summary"] = summarise(results)
    results["end_to_end_over_median_step_ratio"] = end_to_end_over_median_step(results["summary"])
    results.update(extra or {})
    write_json(results, out)
    sibling(out, ".md").write_text(robustness_markdown(results))
    plot_front(results, sibling(out, ".png"))
    print(robustness_markdown(results))
    return results


# The order in which `--jobs` starts the (method, seed) runs: LoRA's first, so that the reference of every time
# ratio runs beside another run like the rest do, then the others from the longest down (train + evaluation time
# per seed in benchmarks/results/robustness.json), so that short runs fill the end and the processes finish close
# together.
JOB_ORDER = (
    "lora",
    "ran",
    "trades",
    "fgsm_rs",
    "pgd_at",
    "pmg_aft",
    "fare",
    "tecoa",
    "ran_carry",
    "ran_features",
)
JOB_ORDER += ("ran_every2", "ran_every3", "ran_every3_kl3", "ran_every3_strong", "ran_boundary25")
JOB_ORDER += ("ran_free2", "ran_free3", "ran_free4", "ran_free2_kl2", "ran_free2_eps6", "ran_free2_eps8")
JOB_ORDER += ("ran_features_task", "ran_every3_eps8", "ran_every4_eps8")
JOB_ORDER += TERM_ABLATIONS


def job_units(seeds: list[int], methods: list[str]) -> list[tuple[str, int]]:
    """The (method, seed) runs of a `--jobs` run, in the order they start."""
    order = [name for name in JOB_ORDER if name in methods]
    return [(name, seed) for name in order for seed in seeds]


def run_in_processes(
    argv: list[str],
    units: list[tuple[str, int]],
    jobs: int,
    threads: int | None,
    out: Path,
    *,
    script: str = __file__,
    join=None,
) -> dict[str, Any]:
    """Run this script once per (method, seed), `jobs` processes at a time, then join the results into `out`.

    Each run writes `<out stem>-parts/<method>-seed<S>.json` (and its log beside it). The last occurrence of an
    option wins with argparse, so each child gets the caller's options followed by its own `--methods`, `--seeds`,
    `--out`, `--jobs` and `--threads`. A run gives the same numbers in a process of its own as in one process
    with every method: each method starts from the reloaded base weights and is seeded on its own.

    `script` and `join(parts, extra)` let another benchmark with the same options (`vqa_robustness.py`) run its own
    children and join them its own way (default: this script and `merge` into `out`).
    """
    folder = out.with_name(f"{out.stem}-parts")
    folder.mkdir(parents=True, exist_ok=True)
    threads = threads or 1
    pending = list(units)
    running: list[tuple[str, subprocess.Popen, Path, Any]] = []
    parts: list[str] = []
    failed: list[str] = []
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            name, seed = pending.pop(0)
            label = f"{name} seed {seed}"
            part = folder / f"{name}-seed{seed}.json"
            log = open(part.with_suffix(".log"), "w")  # noqa: SIM115 (closed when the child ends)
            command = [sys.executable, os.path.abspath(script), *argv]
            command += ["--methods", name, "--seeds", str(seed), "--out", str(part)]
            command += ["--jobs", "1", "--threads", str(threads)]
            print(f"{label}: started, log in {part.with_suffix('.log')}", flush=True)
            # OpenMP threads beyond --threads would contend with the other processes for the same cores
            environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            running.append((label, child, part, log))
        time.sleep(0.5)
        for entry in list(running):
            label, process, part, log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if process.returncode == 0:
                parts.append(str(part))
                print(f"{label}: done after {time.perf_counter() - started:.0f} s", flush=True)
            else:
                failed.append(f"{label} (exit {process.returncode}; see {part.with_suffix('.log')})")
    if failed:
        raise SystemExit(f"error: --jobs: {', '.join(failed)} failed; the finished runs are in {folder}.")
    extra = {"total_seconds": time.perf_counter() - started, "jobs": jobs}
    results = join(parts, extra) if join else merge(parts, out, extra=extra)
    print(f"total {results['total_seconds']:.0f} s with {jobs} processes; wrote {out}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--methods", default=",".join(PEERS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    parser.add_argument(
        "--seeds", default=None, help=f"comma-separated training seeds (default {DEFAULTS['seeds']})"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run each (method, seed) in a process of its own, this many at once, then join them (default 1: all "
        "in one process)",
    )
    parser.add_argument(
        "--merge",
        default=None,
        help="comma-separated result files of earlier runs to join into --out (no training)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge([p.strip() for p in args.merge.split(",") if p.strip()], Path(args.out))
    args = resolve_sizes(args)
    seeds = parse_seeds(args.seeds or (QUICK if args.quick else DEFAULTS)["seeds"])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"error: --methods={args.methods!r}: each must be one of {','.join(METHODS)}.")
    out = Path(args.out)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs={args.jobs} must be >= 1.")
    units = job_units(seeds, methods)
    if args.jobs > 1 and len(units) > 1:
        forwarded = list(sys.argv[1:] if argv is None else argv)
        return run_in_processes(forwarded, units, args.jobs, args.threads, out)

    setup = prepare(args)
    default = clip_ran_config(setup.pixel_box)
    configs = {
        **peer_configs(default, attack_steps=BASELINE_ATTACK_STEPS),
        **light_weight_configs(default),
        **term_ablation_configs(default),
    }
    configs = {name: configs[name] for name in METHODS if name in methods}
    check_evaluation_is_stronger(setup, configs)
    results = {
        "benchmark": "robustness",
        **environment(setup),
        "seeds": seeds,
        "baseline_attack_steps": BASELINE_ATTACK_STEPS,
        "recipes": {name: config.recipe_dict() for name, config in configs.items()},
        "runs": {name: {} for name in configs},
        "summary": {},
    }
    started = time.perf_counter()
    # Seed by seed, every method: each seed's LoRA run is the time reference of the same seed's other runs, and an
    # interrupted run leaves whole seeds behind.
    for seed in seeds:
        for name, config in configs.items():
            results["runs"][name][str(seed)] = run_method(setup, name, replace(config), seed=seed)
            add_ratios(results)
            results["summary"] = summarise(results)
            results["end_to_end_over_median_step_ratio"] = end_to_end_over_median_step(results["summary"])
            results["elapsed_seconds"] = time.perf_counter() - started
            write_json(results, out)  # partial results survive an interrupted run
    results["total_seconds"] = time.perf_counter() - started
    write_json(results, out)
    sibling(out, ".md").write_text(robustness_markdown(results))
    plot_front(results, sibling(out, ".png"))
    print(robustness_markdown(results))
    print(
        f"total {results['total_seconds']:.0f} s; wrote {out}, {sibling(out, '.md')}, {sibling(out, '.png')}"
    )
    return results


if __name__ == "__main__":
    main()
