"""Command-line pieces of the fine-tuning scripts, for the examples and a user's own script alike (the way TRL ships
`ScriptArguments`): the options as a dataclass `HfArgumentParser` reads, their checks (one `error:` line per bad
argument, nothing written), and the train-measure-save glue of prompt-classification fine-tuning.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ran_peft.open_clip import is_open_clip_name

DEFAULT_TARGET_MODULES = "q_proj,v_proj"


OPEN_CLIP_TARGET_MODULES = "qkv,query,value"


@dataclass
class FinetuneArguments:
    """Every option of the script (`--help` prints them)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a CLIP/SigLIP-style model or an image classifier. "
            "Default: the embedded offline model (a small CLIP pre-trained on synthetic upstream data)."
        },
    )
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic' (built-in, offline), a Hub dataset id, an image folder or a DICOM folder."
        },
    )
    task: str = field(
        default="anatomy",
        metadata={
            "help": "Label of the synthetic data: anatomy (default), modality, finding (hard) or laterality (hard)."
        },
    )
    output_dir: str = field(
        default="outputs/ran-finetune", metadata={"help": "Where the adapter and reports go."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an adapter already in --output-dir."})
    max_steps: int = field(default=150, metadata={"help": "Optimiser steps of fine-tuning."})
    batch_size: int = field(default=32, metadata={"help": "Per-device training batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the adapter."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    target_modules: str = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={
            "help": f"Comma-separated LoRA target modules; for open_clip models (hf-hub:/local-dir:) the default is "
            f"{OPEN_CLIP_TARGET_MODULES} (BiomedCLIP's timm ViT and BERT attention)."
        },
    )
    epsilon: float = field(default=4 / 255, metadata={"help": "RAN attack budget in [0, 1] pixel units."})
    attack_steps: int = field(default=1, metadata={"help": "RAN PGD steps per batch."})
    adversarial_weight: float = field(default=0.5, metadata={"help": "RAN clean/adversarial mix weight."})
    kl_weight: float = field(default=1.0, metadata={"help": "RAN KL rectification weight."})
    consistency_weight: float = field(default=0.0, metadata={"help": "RAN feature-consistency weight."})
    covariance_weight: float = field(default=0.0, metadata={"help": "RAN covariance (decorrelation) weight."})
    spectrum_weight: float = field(default=0.0, metadata={"help": "RAN spectrum weight."})
    noise_warmup_steps: int = field(default=0, metadata={"help": "Steps over which epsilon and kl ramp up."})
    free_start: bool = field(
        default=True, metadata={"help": "First attack step from the clean pass's gradient."}
    )
    text_epsilon: float = field(
        default=0.0, metadata={"help": "Budget of the text-embedding attack (0: off)."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base model in 4-bit nf4 (bitsandbytes)."}
    )
    compare_lora: bool = field(default=False, metadata={"help": "Also train plain LoRA for the same steps."})
    train_size: int = field(default=2000, metadata={"help": "Rows of the synthetic training set."})
    eval_size: int = field(default=300, metadata={"help": "Rows evaluated (clean and under attack)."})
    eval_epsilons: str = field(
        default="1/255,2/255,4/255", metadata={"help": "Comma-separated attack budgets."}
    )
    eval_attack: str = field(
        default="autoattack-quick",
        metadata={
            "help": "Attack of the reported robust accuracy: autoattack (AutoAttack's standard set: APGD-CE, "
            "APGD-T, FAB-T, Square 5000 queries), autoattack-quick (the same attacks with fewer iterations, named "
            "as such), or pgd (the project's PGD, --eval-attack-steps and --eval-restarts)."
        },
    )
    eval_attack_steps: int = field(default=10, metadata={"help": "PGD steps with --eval-attack pgd."})
    eval_restarts: int = field(default=1, metadata={"help": "PGD restarts with --eval-attack pgd."})
    prompt_template: str = field(default="A medical image showing {}.", metadata={"help": "Class prompt."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the adapter and its card to the Hub."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push-to-hub."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


class UsageError(ValueError):
    """A bad argument: reported as one line, before anything is written."""


# The RANConfig fields a fine-tuning script may expose as options of the same name.
RECIPE_OPTIONS = (
    "epsilon",
    "attack_steps",
    "adversarial_weight",
    "kl_weight",
    "consistency_weight",
    "covariance_weight",
    "spectrum_weight",
    "noise_warmup_steps",
    "free_start",
    "text_epsilon",
)


def parse_budgets(text: str) -> list[float]:
    """`--eval-epsilons`: comma-separated attack budgets in (0, 1], as numbers or `k/255`."""
    from ran_peft.evaluation import parse_epsilon

    try:
        budgets = [parse_epsilon(value) for value in text.split(",") if value.strip()]
    except ValueError as error:
        raise UsageError(f"--eval-epsilons={text!r}: {error}") from error
    if not budgets or any(not 0 < value <= 1 for value in budgets):
        raise UsageError(f"--eval-epsilons={text!r}: every budget must be in (0, 1].")
    return budgets


def check_output_and_quantisation(args) -> None:
    """4-bit needs bitsandbytes; an adapter already in --output-dir is replaced only with --overwrite."""
    if args.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes.")
    if (Path(args.output_dir) / "adapter_config.json").exists() and not args.overwrite:
        raise UsageError(
            f"--output-dir={args.output_dir} already holds an adapter; pass --overwrite or another folder."
        )


def ran_config_from_arguments(args):
    """The RANConfig of the script's LoRA and recipe options (those it has of `RECIPE_OPTIONS`)."""
    from ran_peft import RANConfig

    recipe = {name: getattr(args, name) for name in RECIPE_OPTIONS if hasattr(args, name)}
    try:
        return RANConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            target_modules=[name.strip() for name in args.target_modules.split(",") if name.strip()],
            **recipe,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error


def check_arguments(args: FinetuneArguments):
    """Validate everything that can be checked before loading anything; returns the RANConfig and the budgets."""
    from ran_peft.data import SYNTHETIC_TASKS

    if args.task not in SYNTHETIC_TASKS:
        raise UsageError(f"--task={args.task!r} must be one of {', '.join(SYNTHETIC_TASKS)}.")
    if args.max_steps < 1:
        raise UsageError(f"--max-steps={args.max_steps} must be >= 1.")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} must be >= 1.")
    epsilons = parse_budgets(args.eval_epsilons)
    from ran_peft.experiments import EVAL_ATTACKS

    if args.eval_attack not in EVAL_ATTACKS:
        raise UsageError(f"--eval-attack={args.eval_attack!r} must be one of {', '.join(EVAL_ATTACKS)}.")
    if args.push_to_hub and not args.hub_repo_id:
        raise UsageError("--push-to-hub needs --hub-repo-id owner/name.")
    if is_open_clip_name(args.model):
        if (
            args.target_modules == DEFAULT_TARGET_MODULES
        ):  # transformers' names: open_clip towers name them otherwise
            args.target_modules = OPEN_CLIP_TARGET_MODULES
        folder = args.model.removeprefix("local-dir:")
        if args.model.startswith("local-dir:") and not os.path.isdir(folder):
            raise UsageError(f"--model={args.model!r}: no such folder {folder!r}.")
        if not args.model.startswith("local-dir:") and not looks_like_hub_id(
            args.model.removeprefix("hf-hub:")
        ):
            raise UsageError(f"--model={args.model!r} is not an open_clip Hub name (hf-hub:owner/name).")
    elif args.model is not None and not os.path.isdir(args.model) and not looks_like_hub_id(args.model):
        raise UsageError(
            f"--model={args.model!r} is neither a local folder nor a Hub id (owner/name), nor an open_clip name "
            "(hf-hub:owner/name or local-dir:folder)."
        )
    check_output_and_quantisation(args)
    return ran_config_from_arguments(args), epsilons


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(part and not part.startswith(".") for part in parts)


def load_data(args: FinetuneArguments):
    from ran_peft.data import load_dataset_any, synthetic_medical_dataset

    if args.dataset == "synthetic":
        train = synthetic_medical_dataset(
            args.train_size, seed=args.seed, image_size=64, task=args.task, split_name="train"
        )
        evaluation = synthetic_medical_dataset(
            args.eval_size, seed=args.seed, image_size=64, task=args.task, split_name="test"
        )
        return train, evaluation
    try:
        data = load_dataset_any(args.dataset)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--dataset={args.dataset!r}: {error}") from error
    if "image" not in data.column_names:
        raise UsageError(f"--dataset={args.dataset!r} has no images (columns: {data.column_names}).")
    if "label" not in data.column_names:
        raise UsageError(
            f"--dataset={args.dataset!r} has no labels to classify (columns: {data.column_names})."
        )
    split = data.train_test_split(test_size=min(args.eval_size, len(data) // 5 or 1), seed=args.seed)
    return split["train"], split["test"]


def plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, run in metrics["runs"].items():
        keys = ["0", *run["robust_accuracy"].keys()]
        values = [run["clean_accuracy"], *run["robust_accuracy"].values()]
        axis.plot(keys, [100 * v for v in values], marker="o", label=name)
    axis.set_xlabel(f"attack budget ({metrics['attack'].get('name', 'PGD')}, pixel units)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("Clean and robust accuracy")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(metrics: dict) -> str:
    runs = metrics["runs"]
    keys = list(next(iter(runs.values()))["robust_accuracy"].keys())
    lines = [f"{'model':<12} {'clean':>7} " + " ".join(f"{'@' + k:>9}" for k in keys)]
    for name, run in runs.items():
        cells = " ".join(f"{100 * run['robust_accuracy'][k]:9.1f}" for k in keys)
        lines.append(f"{name:<12} {100 * run['clean_accuracy']:7.1f} {cells}")
    return "\n".join(lines)


def classification_setup(args, processor, train, config, source: str, epsilons: list[float]):
    """What training and measuring a dual encoder as a prompt classifier needs, from the script's options.

    Returns the class prompts (tokenised), the collator, the pixel box and the experiment settings; records the
    pixel mean/std and the base model in `config`.
    """
    from ran_peft import PixelBox
    from ran_peft.data import ImageTextCollator, tokenize_class_prompts

    label_feature = train.features["label"]
    if not hasattr(label_feature, "names"):
        raise UsageError(
            f"--dataset={args.dataset!r}: the label column needs class names (a ClassLabel feature)."
        )
    class_text_inputs = tokenize_class_prompts(
        processor.tokenizer, label_feature.names, template=args.prompt_template
    )
    collator = ImageTextCollator(processor.image_processor, processor.tokenizer, mode="classification")
    pixel_box = PixelBox.from_processor(processor)
    config.image_mean, config.image_std = list(pixel_box.mean), list(pixel_box.std)
    config.base_model_name_or_path = source
    return class_text_inputs, collator, pixel_box, experiment_settings(args, epsilons)


def experiment_settings(args, epsilons: list[float]):
    """The `ExperimentSettings` of a script's training and evaluation options (those of them it has)."""
    from ran_peft.experiments import ExperimentSettings

    names = ("eval_attack", "eval_attack_steps", "eval_restarts", "eval_batch_size")
    return ExperimentSettings(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        eval_epsilons=tuple(epsilons),
        progress=args.progress,
        **{name: getattr(args, name) for name in names if hasattr(args, name)},
    )


def train_measure_and_save(
    args,
    model,
    fresh_base,
    config,
    train,
    evaluation,
    collator,
    processor,
    pixel_box,
    settings,
    metrics,
    *,
    class_text_inputs,
    distributed: bool = False,
) -> dict:
    """Train RAN (and LoRA with --compare-lora, on `fresh_base()`), measure both, save the adapter with its card."""
    from ran_peft.experiments import evaluate_adapter, lora_equivalent, train_adapter
    from ran_peft.hub import push_adapter, save_adapter

    measure = {"class_text_inputs": class_text_inputs}
    output = Path(args.output_dir)
    work_dir = Path(tempfile.mkdtemp(prefix=".ran-finetune-work-"))
    try:
        trainer, ran_model, seconds = train_adapter(
            model, config, train, collator, processor.image_processor, settings, work_dir, **measure
        )
        if not trainer.is_world_process_zero():
            return metrics
        if args.compare_lora and not distributed:
            _, lora_model, lora_seconds = train_adapter(
                fresh_base(),
                lora_equivalent(config),
                train,
                collator,
                processor.image_processor,
                settings,
                work_dir,
                **measure,
            )
            metrics["runs"]["lora"] = evaluate_adapter(
                lora_model, evaluation, collator, pixel_box, settings, **measure
            )
            metrics["runs"]["lora"]["train_seconds"] = lora_seconds
        metrics["runs"]["ran"] = evaluate_adapter(
            ran_model, evaluation, collator, pixel_box, settings, **measure
        )
        metrics["runs"]["ran"]["train_seconds"] = seconds
        attack = metrics["runs"]["ran"]["attack"]
        # the card and the table name the attack; the per-attack numbers stay in each run's record
        metrics["attack"] = {key: value for key, value in attack.items() if key != "per_attack"}
        metrics["train_log"] = [entry for entry in trainer.state.log_history if "loss" in entry]
        save_adapter(ran_model, output, metrics=metrics, datasets=[args.dataset], overwrite=args.overwrite)
        plot(metrics, output / "ran_metrics.png")
        print(table(metrics))
        print(f"adapter, model card, ran_metrics.json and ran_metrics.png in {output}")
        if args.push_to_hub:
            print(push_adapter(output, args.hub_repo_id))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        _end_process_group()
    return metrics


def _end_process_group() -> None:
    """Tear down the `torchrun` process group before the interpreter exits.

    Left alive, gloo's threads can outlive the interpreter's teardown: the process then aborts with `terminate called
    without an active exception` (SIGABRT) after everything is saved, and `torchrun` reports the run as failed.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def report_errors(job: Callable[[], object]) -> int:
    """Run `job`; a bad argument or a failure ends as one `error:` line (the traceback with RAN_PEFT_DEBUG=1).

    Exit status: 0 done, 2 bad argument (`UsageError`), 1 anything else.
    """
    try:
        job()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if os.environ.get("RAN_PEFT_DEBUG"):
            raise
        print(
            f"error: {type(error).__name__}: {error} (set RAN_PEFT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
