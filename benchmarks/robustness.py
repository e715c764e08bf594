"""Clean and robust accuracy of LoRA, PGD-10 adversarial training, TRADES-10 and RAN, fine-tuned the same way.

Each method starts from the same base weights (reloaded from the model folder), trains the same adapter on the same
synthetic medical-style data for the same steps with the same seed, and is evaluated under PGD-20 with one restart
(stronger than any training attack) at each budget. Writes FILE.json, FILE.md (a table) and FILE.png (a plot).

    python benchmarks/robustness.py --out robustness.json [--quick] [--methods lora,ran]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# This folder holds `kernels.py`: keep it off the import path, where Hugging Face's own `kernels` package is sought.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from ran_peft import PixelBox, RANConfig  # noqa: E402
from ran_peft.data import ImageTextCollator, synthetic_medical_dataset, tokenize_class_prompts  # noqa: E402
from ran_peft.evaluation import format_epsilon  # noqa: E402
from ran_peft.experiments import (  # noqa: E402
    ExperimentSettings,
    baseline_configs,
    evaluate_adapter,
    train_adapter,
)

METHODS = ("lora", "pgd_at", "trades", "ran")
BASELINE_ATTACK_STEPS = 10
EVAL_EPSILONS = (1 / 255, 2 / 255, 4 / 255)
# Defaults sized for about 20 minutes on 2 CPU cores for the four methods (see the README's benchmark notes).
DEFAULTS = dict(
    steps=150, batch_size=32, train_size=2000, eval_size=300, eval_attack_steps=20, eval_restarts=1
)
QUICK = dict(steps=8, batch_size=32, train_size=256, eval_size=32, eval_attack_steps=20, eval_restarts=1)


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
        "--eval-attack-steps",
        type=int,
        default=None,
        help=f"PGD steps at evaluation (default {DEFAULTS['eval_attack_steps']})",
    )
    parser.add_argument(
        "--eval-restarts", type=int, default=None, help="PGD restarts at evaluation (default 1)"
    )
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the sizes not given on the command line from QUICK or DEFAULTS."""
    base = QUICK if args.quick else DEFAULTS
    for name, value in base.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "train_size", "eval_size", "eval_attack_steps", "eval_restarts"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    return args


# -- shared setup ----------------------------------------------------------------------------------------------


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


def default_ran_config(setup: Setup) -> RANConfig:
    """The default RAN recipe on the adapter every method shares (rank 8 on the attention q/v projections)."""
    return RANConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        image_mean=list(setup.pixel_box.mean),
        image_std=list(setup.pixel_box.std),
    )


def check_evaluation_is_stronger(setup: Setup, configs: dict[str, RANConfig]) -> None:
    """Robust accuracy must come from an attack stronger than any the models were trained with."""
    strongest = max((c.attack_steps for c in configs.values() if c.attacks), default=0)
    if setup.settings.eval_attack_steps <= strongest:
        raise SystemExit(
            f"error: the evaluation attack (PGD-{setup.settings.eval_attack_steps}) must be stronger than the "
            f"strongest training attack (PGD-{strongest}): raise --eval-attack-steps."
        )


def run_method(setup: Setup, name: str, config: RANConfig) -> dict[str, Any]:
    """Train one adapter from a fresh copy of the base and evaluate it; a JSON-ready record."""
    print(f"[{name}] training {setup.settings.max_steps} steps ...", flush=True)
    torch.manual_seed(setup.settings.seed)
    work_dir = tempfile.mkdtemp(prefix=f".robustness-{name}-")
    try:
        trainer, model, seconds = train_adapter(
            load_base(setup.model_folder),
            config,
            setup.train,
            setup.collator,
            setup.processor.image_processor,
            setup.settings,
            work_dir,
            class_text_inputs=setup.class_text_inputs,
        )
        print(f"[{name}] trained in {seconds:.1f} s; evaluating ...", flush=True)
        start = time.perf_counter()
        report = evaluate_adapter(
            model,
            setup.evaluation,
            setup.collator,
            setup.pixel_box,
            setup.settings,
            class_text_inputs=setup.class_text_inputs,
            check_steps=True,
        )
        eval_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "clean_acc": report["clean_accuracy"],
        "robust_acc": report["robust_accuracy"],
        "train_seconds": seconds,
        "step_seconds": seconds / setup.settings.max_steps,
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
        f"[{name}] clean {100 * record['clean_acc']:5.1f}  {robust}  "
        f"(train {seconds:.1f} s, eval {eval_seconds:.1f} s)",
        flush=True,
    )
    return record


def environment(setup: Setup) -> dict[str, Any]:
    """Where and how the numbers were measured."""
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "torch_version": torch.__version__,
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


def describe_attack(results: dict[str, Any]) -> str:
    settings = results["settings"]
    return (
        f"PGD-{settings['eval_attack_steps']} (L-inf, step 2.5·ε/steps, random start), "
        f"{settings['eval_restarts']} restart(s), on {settings['eval_size']} held-out samples; "
        f"{settings['max_steps']} steps of batch {settings['batch_size']}, seed {settings['seed']}, "
        f"task `{settings['task']}`, torch {results['torch_version']}, "
        f"{results['machine']['cpus']} CPUs ({results['machine']['torch_threads']} torch threads)."
    )


def masking_note(runs: dict[str, dict[str, Any]]) -> str:
    failed = [name for name, run in runs.items() if not run["passed_checks"]]
    if failed:
        return (
            f"**Gradient-masking checks failed for: {', '.join(failed)}**: their robust numbers are suspect."
        )
    steps = next(iter(runs.values()))["attack"]["steps"]
    return (
        f"Gradient-masking checks (a zero budget gives the clean predictions, accuracy falls with ε, PGD-{steps // 2} "
        f"does not beat PGD-{steps}): passed for every row."
    )


def robustness_markdown(results: dict[str, Any]) -> str:
    runs = results["methods"]
    keys = list(next(iter(runs.values()))["robust_acc"])
    lora_step = runs["lora"]["step_seconds"] if "lora" in runs else None
    header = (
        "| method | clean | " + " | ".join(f"robust @{k}" for k in keys) + " | train s | step time / LoRA |"
    )
    lines = [header, "|" + " --- |" * (len(keys) + 4)]
    for name, run in runs.items():
        ratio = f"{run['step_seconds'] / lora_step:.2f}" if lora_step else "n/a"
        cells = " | ".join(percent(run["robust_acc"][k]) for k in keys)
        lines.append(
            f"| {name} | {percent(run['clean_acc'])} | {cells} | {run['train_seconds']:.1f} | {ratio} |"
        )
    return "\n".join(
        [
            "# Robustness: LoRA vs PGD-AT vs TRADES vs RAN",
            "",
            "Accuracy in %. " + describe_attack(results),
            "",
            *lines,
            "",
            masking_note(runs),
            "",
        ]
    )


def plot_accuracy(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against the attack budget, one line per run (clean accuracy at budget 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ran_peft.evaluation import parse_epsilon

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        budgets = [0.0, *(255 * parse_epsilon(k) for k in run["robust_acc"])]
        accuracy = [run["clean_acc"], *run["robust_acc"].values()]
        axis.plot(budgets, [100 * a for a in accuracy], marker="o", label=name)
    axis.set_xlabel("PGD budget ε (× 1/255)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    args = resolve_sizes(parser.parse_args(argv))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"error: --methods={args.methods!r}: each must be one of {','.join(METHODS)}.")
    out = Path(args.out)

    setup = prepare(args)
    configs = baseline_configs(default_ran_config(setup), attack_steps=BASELINE_ATTACK_STEPS)
    configs = {name: configs[name] for name in METHODS if name in methods}
    check_evaluation_is_stronger(setup, configs)
    results = {
        "benchmark": "robustness",
        **environment(setup),
        "baseline_attack_steps": BASELINE_ATTACK_STEPS,
        "recipes": {name: config.recipe_dict() for name, config in configs.items()},
        "methods": {},
    }
    started = time.perf_counter()
    for name, config in configs.items():
        results["methods"][name] = run_method(setup, name, replace(config))
        write_json(results, out)  # partial results survive an interrupted run
    results["total_seconds"] = time.perf_counter() - started
    if "lora" in results["methods"]:
        lora_step = results["methods"]["lora"]["step_seconds"]
        for run in results["methods"].values():
            run["step_time_ratio_to_lora"] = run["step_seconds"] / lora_step
    write_json(results, out)
    sibling(out, ".md").write_text(robustness_markdown(results))
    plot_accuracy(results["methods"], sibling(out, ".png"), "Clean and PGD robust accuracy")
    print(robustness_markdown(results))
    print(
        f"total {results['total_seconds']:.0f} s; wrote {out}, {sibling(out, '.md')}, {sibling(out, '.png')}"
    )
    return results


if __name__ == "__main__":
    main()
