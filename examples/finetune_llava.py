"""Fine-tune a generative vision-language model (LLaVA-style) with RAN on visual question answering, through TRL's
`SFTTrainer` (the way these models are fine-tuned) and `RANCallback`: the LoRA call with `peft_config=RANConfig(...)`
for `LoraConfig(...)` and `callbacks=[RANCallback()]` added. Needs `ran-peft[trl]`.

With no arguments it runs offline: the generative default (a small LLaVA whose vision tower is the embedded CLIP's and
whose projector and language model were trained on synthetic scans, captions and questions; built on first use and
cached) is fine-tuned on a closed-set medical VQA task in the manner of VQA-RAD's closed questions (yes/no, organ and
modality names) on synthetic scans. Clean and robust accuracy of the answers are measured before and after:
AutoAttack (-quick by default) on the closed-set answers' first-token logits, and the greedy `generate` answer scored
on the adversarial images it found. `--tiny` runs a tiny random LLaVA (smoke runs; its answers mean nothing); a real
model and a Hub dataset need the network:

    python examples/finetune_llava.py
    python examples/finetune_llava.py --tiny --max-steps 20
    python examples/finetune_llava.py --model chaoyinshe/llava-med-v1.5-mistral-7b-hf --load-in-4bit \
        --dataset flaviagiammarino/vqa-rad --image-column image --question-column question --answer-column answer

Open questions of a Hub dataset (answers outside `--closed-answers`) get PGD-100 with 3 restarts on the answer-token
loss (PGD-50 x 2 with autoattack-quick), reported apart and labelled as such. It leaves in `--output-dir`: the adapter
(loads in stock PEFT), its model card (README.md) and `ran_metrics.json`, with the figures it prints.
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of non-4-bit runs)

# isort: split

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from ran_peft.scripts import (
    UsageError,
    check_output_and_quantisation,
    experiment_settings,
    looks_like_hub_id,
    parse_budgets,
    ran_config_from_arguments,
    report_errors,
)

logger = logging.getLogger("ran_peft.finetune_llava")

# The offline default learns from scratch-sized data in a few minutes, so it takes a larger step than a real model.
DEFAULT_MODEL_LEARNING_RATE = 2e-3
HUB_MODEL_LEARNING_RATE = 2e-4


@dataclass
class LlavaFinetuneArguments:
    """Every option of the script (`--help` prints them)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a generative VLM that AutoModelForImageTextToText loads "
            "(LLaVA-style, e.g. chaoyinshe/llava-med-v1.5-mistral-7b-hf). Default: the generative default, a small "
            "LLaVA built offline on first use (the embedded CLIP's vision tower, a language model trained on "
            "synthetic captions and questions)."
        },
    )
    tiny: bool = field(
        default=False,
        metadata={
            "help": "Use a tiny random LLaVA built offline (for smoke runs; its answers mean nothing)."
        },
    )
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic' (built-in, offline: closed-set questions about synthetic scans, VQA-RAD style), a "
            "Hub VQA dataset id, or a folder written by datasets' save_to_disk."
        },
    )
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    image_column: str = field(default="image", metadata={"help": "Image column of a Hub dataset."})
    question_column: str = field(default="question", metadata={"help": "Question column of a Hub dataset."})
    answer_column: str = field(
        default="answer", metadata={"help": "Answer (or report) column of a Hub dataset."}
    )
    closed_answers: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated answers of the closed-set questions (scored with AutoAttack on their first "
            "tokens); rows with other answers are open questions (PGD). Default: the synthetic task's answers, or "
            "yes,no for a Hub dataset (VQA-RAD's closed questions)."
        },
    )
    output_dir: str = field(
        default="outputs/ran-finetune-llava", metadata={"help": "Where the adapter and reports go."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an adapter already in --output-dir."})
    max_steps: int = field(default=150, metadata={"help": "Optimiser steps of fine-tuning."})
    batch_size: int = field(default=16, metadata={"help": "Per-device training batch size."})
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"AdamW learning rate of the adapter. Default: {DEFAULT_MODEL_LEARNING_RATE} for the offline "
            f"default and --tiny, {HUB_MODEL_LEARNING_RATE} for --model."
        },
    )
    max_answer_tokens: int = field(
        default=64, metadata={"help": "Answers are cut to this many tokens (the prompt never is)."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    target_modules: str = field(
        default="q_proj,v_proj",
        metadata={
            "help": "Comma-separated LoRA target modules (in the vision tower and the language model)."
        },
    )
    epsilon: float = field(default=4 / 255, metadata={"help": "RAN attack budget in [0, 1] pixel units."})
    attack_steps: int = field(default=1, metadata={"help": "RAN PGD steps per batch."})
    adversarial_weight: float = field(default=0.5, metadata={"help": "RAN clean/adversarial mix weight."})
    kl_weight: float = field(
        default=1.0, metadata={"help": "RAN KL rectification weight (over the answer tokens' distributions)."}
    )
    consistency_weight: float = field(default=0.0, metadata={"help": "RAN feature-consistency weight."})
    noise_warmup_steps: int = field(default=0, metadata={"help": "Steps over which epsilon and kl ramp up."})
    free_start: bool = field(
        default=True, metadata={"help": "First attack step from the clean pass's gradient."}
    )
    compare_lora: bool = field(default=False, metadata={"help": "Also train plain LoRA for the same steps."})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base model in 4-bit nf4 (bitsandbytes), QLoRA-style."}
    )
    train_size: int = field(
        default=2000, metadata={"help": "Training rows (synthetic: rows made; Hub: at most)."}
    )
    eval_size: int = field(
        default=100, metadata={"help": "Rows evaluated before and after (clean and attacked)."}
    )
    eval_batch_size: int = field(
        default=128,
        metadata={
            "help": "Batch size of the evaluation (rows are sorted by question: AutoAttack runs once per group of "
            "rows that share a question in a batch)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory in training (for large models)."}
    )
    eval_epsilons: str = field(
        default="1/255,2/255,4/255", metadata={"help": "Comma-separated attack budgets of the evaluation."}
    )
    eval_attack: str = field(
        default="autoattack-quick",
        metadata={
            "help": "Attack of the reported robust accuracy: autoattack (AutoAttack's standard set on the closed-set "
            "answers' first-token logits; PGD-100 x 3 restarts on the answer-token loss for open questions), "
            "autoattack-quick (the same attacks with fewer iterations; PGD-50 x 2 for open questions; named as "
            "such), or pgd (the project's PGD with --eval-attack-steps: the training tool)."
        },
    )
    eval_attack_steps: int = field(default=5, metadata={"help": "PGD steps with --eval-attack pgd."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


def check_arguments(args: LlavaFinetuneArguments):
    """Validate everything that can be checked before loading anything; returns the RANConfig and the budgets."""
    if args.tiny and args.model is not None:
        raise UsageError("pass at most one of --model (a Hub id or folder) and --tiny.")
    if args.model is not None and not os.path.isdir(args.model) and not looks_like_hub_id(args.model):
        raise UsageError(f"--model={args.model!r} is neither a local folder nor a Hub id (owner/name).")
    for name in (
        "max_steps",
        "batch_size",
        "max_answer_tokens",
        "train_size",
        "eval_size",
        "eval_batch_size",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1.")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise UsageError(f"--learning-rate={args.learning_rate} must be > 0.")
    from ran_peft.experiments import EVAL_ATTACKS

    if args.eval_attack not in EVAL_ATTACKS:
        raise UsageError(f"--eval-attack={args.eval_attack!r} must be one of {', '.join(EVAL_ATTACKS)}.")
    closed_answers(args)
    epsilons = parse_budgets(args.eval_epsilons)
    check_output_and_quantisation(args)
    return ran_config_from_arguments(args), epsilons


def closed_answers(args: LlavaFinetuneArguments) -> list[str]:
    """The answers of the closed-set questions: `--closed-answers`, else the synthetic task's or yes/no."""
    from ran_peft.data.vqa import CLOSED_ANSWERS

    if args.closed_answers is None:
        return list(CLOSED_ANSWERS) if args.dataset == "synthetic" else ["yes", "no"]
    answers = [answer.strip() for answer in args.closed_answers.split(",") if answer.strip()]
    if not answers or len({a.lower() for a in answers}) != len(answers):
        raise UsageError(
            f"--closed-answers={args.closed_answers!r} must list at least one answer, each once (comma-separated)."
        )
    return answers


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def base_model_source(args: LlavaFinetuneArguments) -> str:
    """Where the base model comes from: --model, else the tiny random LLaVA or the generative default (both built
    offline on first use and cached)."""
    from ran_peft.data.vqa import CLOSED_ANSWERS, closed_question_texts
    from ran_peft.pretrain import build_tiny_llava
    from ran_peft.pretrain_llava import build_default_llava

    if args.model is not None:
        return args.model
    if args.tiny:
        return str(build_tiny_llava([*closed_question_texts(), *CLOSED_ANSWERS]))
    return str(build_default_llava(progress=args.progress))


def load_model_and_processor(args: LlavaFinetuneArguments, source: str):
    """The base model (optionally 4-bit nf4, prepared for k-bit training) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if args.load_in_4bit:
        on_gpu = torch.cuda.is_available()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
        )
        kwargs["device_map"] = {"": 0} if on_gpu else "cpu"
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model={source!r} could not be loaded: {str(error).splitlines()[0]}") from error
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise UsageError(f"--model={source!r}: its processor has no image processor and tokenizer.")
    if args.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, processor


# ----------------------------------------------------------------------------------------------------------------
# Data: rows (image, question, answer)
# ----------------------------------------------------------------------------------------------------------------


def load_data(args: LlavaFinetuneArguments):
    """(train, eval) datasets with `image`, `question` and `answer` columns."""
    if args.dataset == "synthetic":
        from ran_peft.data.vqa import synthetic_closed_vqa

        train = synthetic_closed_vqa(args.train_size, seed=args.seed, split_name="train")
        return train, synthetic_closed_vqa(args.eval_size, seed=args.seed, split_name="test")
    from ran_peft.data import load_hub_dataset

    try:
        data = load_hub_dataset(
            args.dataset, split=args.split, image_column=args.image_column, caption_column=args.answer_column
        )
    except (ValueError, FileNotFoundError) as error:
        # name our options, not the loader's arguments
        reason = (
            str(error)
            .replace("caption_column=", "--answer-column=")
            .replace("image_column=", "--image-column=")
        )
        raise UsageError(f"--dataset={args.dataset!r}: {reason}") from error
    if args.question_column not in data.column_names:
        raise UsageError(
            f"--question-column={args.question_column!r}: dataset {args.dataset!r} has no such column; "
            f"available columns: {sorted(data.column_names)}."
        )
    data = data.rename_columns({"caption": "answer", args.question_column: "question"})
    if len(data) < 2:
        raise UsageError(f"--dataset={args.dataset!r} has {len(data)} row(s): at least 2 are needed.")
    split = data.train_test_split(test_size=min(args.eval_size, len(data) // 5 or 1), seed=args.seed)
    train = split["train"]
    return train.select(range(min(args.train_size, len(train)))), split["test"]


# ----------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------


def results_table(metrics: dict) -> str:
    """The printed table: per model, clean and robust accuracy of the closed-set answers under the named attack
    (classifier view), then of the greedy generated answers on the same adversarial images, then open questions."""
    runs = metrics["runs"]
    keys = list(next(iter(runs.values()))["robust_accuracy"])
    header = f"{'model':<8} {'clean':>7} " + " ".join(f"{'@' + key:>8}" for key in keys)

    def rows(pick) -> list[str]:
        lines = []
        for name, run in runs.items():
            scores = pick(run)
            if scores is None:
                continue
            cells = " ".join(f"{100 * scores['robust_accuracy'][key]:8.1f}" for key in keys)
            lines.append(f"{name:<8} {100 * scores['clean_accuracy']:7.1f} {cells}")
        return lines

    first = next(iter(runs.values()))
    closed = first.get("closed_rows", 0)
    lines = [f"Answer accuracy (%) under {first['attack']['name']}: {first['attack']['description']}."]
    lines += [
        "",
        f"{'':<8} closed-set answers, classifier view ({closed} questions)",
        header,
        *rows(lambda r: r),
    ]
    if "generation" in first:
        lines += ["", f"{'':<8} greedy generate on the same adversarial images", header]
        lines += rows(lambda r: r.get("generation"))
    if "open_questions" in first:
        open_attack = first["open_questions"]["attack"]["description"]
        lines += ["", f"{'':<8} open questions ({first['open_rows']}): {open_attack}", header]
        lines += rows(lambda r: r.get("open_questions"))
    return "\n".join(lines)


def run(args: LlavaFinetuneArguments) -> dict:
    from ran_peft import PixelBox
    from ran_peft.data.vqa import VQACollator
    from ran_peft.experiments import evaluate_generative_adapter, lora_equivalent, train_generative_adapter
    from ran_peft.hub import save_adapter

    config, epsilons = check_arguments(args)
    if importlib.util.find_spec("trl") is None:
        raise UsageError("this example trains through TRL's SFTTrainer: `pip install 'ran-peft[trl]'`.")
    answers = closed_answers(args)
    train, evaluation = load_data(args)
    source = base_model_source(args)
    model, processor = load_model_and_processor(args, source)
    collator = VQACollator(processor, max_answer_tokens=args.max_answer_tokens)
    pixel_box = PixelBox.from_processor(processor)
    if pixel_box is None:
        raise UsageError(f"--model={source!r}: its image processor has no image_mean/image_std.")
    config.image_mean, config.image_std = list(pixel_box.mean), list(pixel_box.std)
    config.base_model_name_or_path = source
    if args.learning_rate is None:
        args.learning_rate = HUB_MODEL_LEARNING_RATE if args.model else DEFAULT_MODEL_LEARNING_RATE
    settings = experiment_settings(args, epsilons)
    settings.extra_training_arguments["gradient_checkpointing"] = args.gradient_checkpointing

    def measure(model):
        return evaluate_generative_adapter(model, evaluation, collator, pixel_box, settings, answers=answers)

    base_name = args.model or ("tiny-random-llava" if args.tiny else "generative-default (offline)")
    metrics: dict[str, Any] = {
        "task": "visual question answering: closed-set answers (AutoAttack on the answers' first-token logits; "
        "greedy generate scored on the adversarial images found), open questions under PGD on the answer-token loss",
        "closed_answers": answers,
        "runs": {"before": measure(model)},
        "recipe": config.recipe_dict(),
        "base_model": base_name,
    }
    output = Path(args.output_dir)
    work_dir = Path(tempfile.mkdtemp(prefix=".ran-finetune-llava-work-"))
    try:
        trainer, ran_model, seconds = train_generative_adapter(
            model, config, train, processor, settings, work_dir
        )
        if not trainer.is_world_process_zero():
            return metrics
        if args.compare_lora:
            lora_base, _ = load_model_and_processor(args, source)
            _, lora_model, lora_seconds = train_generative_adapter(
                lora_base, lora_equivalent(config), train, processor, settings, work_dir
            )
            metrics["runs"]["lora"] = {**measure(lora_model), "train_seconds": lora_seconds}
        metrics["runs"]["ran"] = {**measure(ran_model), "train_seconds": seconds}
        attack = metrics["runs"]["ran"]["attack"]
        # the card and the table name the attack; the per-attack numbers stay in each run's record
        metrics["attack"] = {key: value for key, value in attack.items() if key != "per_attack"}
        metrics["train_log"] = [entry for entry in trainer.state.log_history if "loss" in entry]
        save_adapter(ran_model, output, metrics=metrics, datasets=[args.dataset], overwrite=args.overwrite)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(results_table(metrics))
    print(f"adapter, model card and ran_metrics.json in {output}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser(LlavaFinetuneArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
