"""Fine-tune a generative vision-language model (LLaVA-style) with RAN on visual question answering or report
generation, through TRL's `SFTTrainer` (the way these models are fine-tuned) and `RANCallback`: the LoRA call with
`peft_config=RANConfig(...)` for `LoraConfig(...)` and `callbacks=[RANCallback()]` added. Needs `ran-peft[trl]`.

The loss is the language-model loss on the answer tokens only; RAN attacks the image and rectifies the answer's
next-token distributions. `--tiny` runs offline on a tiny random LLaVA (built once and cached); a real model and a
Hub dataset need the network:

    python examples/finetune_llava.py --tiny --max-steps 20
    python examples/finetune_llava.py --model chaoyinshe/llava-med-v1.5-mistral-7b-hf --load-in-4bit \
        --dataset flaviagiammarino/vqa-rad --image-column image --question-column question --answer-column answer

It leaves in `--output-dir`: the adapter (loads in stock PEFT), its model card (README.md) and `ran_metrics.json`
(teacher-forced answer accuracy, clean and under attack, before and after fine-tuning).
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

from ran_peft.pretrain import build_tiny_llava
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

# The synthetic task: question -> the row column that answers it. Short answers make the exact-match accuracy
# informative; the report question trains report generation.
SYNTHETIC_QUESTIONS = {
    "Describe the finding.": "caption",
    "What is the imaging modality?": "modality",
    "Which organ is shown?": "anatomy",
    "What is the finding?": "finding",
}


@dataclass
class LlavaFinetuneArguments:
    """Every option of the script (`--help` prints them)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a generative VLM that AutoModelForImageTextToText loads "
            "(LLaVA-style, e.g. chaoyinshe/llava-med-v1.5-mistral-7b-hf). Required unless --tiny."
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
            "help": "'synthetic' (built-in, offline: questions about synthetic scans, captions as reports), a Hub "
            "VQA dataset id, or a folder written by datasets' save_to_disk."
        },
    )
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    image_column: str = field(default="image", metadata={"help": "Image column of a Hub dataset."})
    question_column: str = field(default="question", metadata={"help": "Question column of a Hub dataset."})
    answer_column: str = field(
        default="answer", metadata={"help": "Answer (or report) column of a Hub dataset."}
    )
    output_dir: str = field(
        default="outputs/ran-finetune-llava", metadata={"help": "Where the adapter and reports go."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an adapter already in --output-dir."})
    max_steps: int = field(default=100, metadata={"help": "Optimiser steps of fine-tuning."})
    batch_size: int = field(default=4, metadata={"help": "Per-device training batch size."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the adapter."})
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
    noise_warmup_steps: int = field(default=10, metadata={"help": "Steps over which epsilon and kl ramp up."})
    free_start: bool = field(
        default=True, metadata={"help": "First attack step from the clean pass's gradient."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base model in 4-bit nf4 (bitsandbytes), QLoRA-style."}
    )
    train_size: int = field(
        default=512, metadata={"help": "Training rows (synthetic: rows made; Hub: at most)."}
    )
    eval_size: int = field(
        default=16, metadata={"help": "Rows evaluated before and after (clean and attacked)."}
    )
    eval_batch_size: int = field(default=4, metadata={"help": "Batch size of the evaluation."})
    eval_epsilons: str = field(
        default="2/255,4/255", metadata={"help": "Comma-separated attack budgets of the evaluation."}
    )
    eval_attack: str = field(
        default="autoattack-quick",
        metadata={
            "help": "Attack of the reported robust accuracy. For a generative VLM, whose answers AutoAttack cannot "
            "score: autoattack = PGD-100 with 3 restarts on the answer-token loss, autoattack-quick = PGD-50 with 2 "
            "restarts (both labelled), pgd = the project's PGD with --eval-attack-steps."
        },
    )
    eval_attack_steps: int = field(default=5, metadata={"help": "PGD steps with --eval-attack pgd."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


def check_arguments(args: LlavaFinetuneArguments):
    """Validate everything that can be checked before loading anything; returns the RANConfig and the budgets."""
    if args.tiny == (args.model is not None):
        raise UsageError("pass exactly one of --model (a Hub id or folder) and --tiny.")
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
    from ran_peft.experiments import EVAL_ATTACKS

    if args.eval_attack not in EVAL_ATTACKS:
        raise UsageError(f"--eval-attack={args.eval_attack!r} must be one of {', '.join(EVAL_ATTACKS)}.")
    epsilons = parse_budgets(args.eval_epsilons)
    check_output_and_quantisation(args)
    return ran_config_from_arguments(args), epsilons


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def load_model_and_processor(args: LlavaFinetuneArguments):
    """The base model (optionally 4-bit nf4, prepared for k-bit training), its processor and where it came from."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    source = str(build_tiny_llava(SYNTHETIC_QUESTIONS)) if args.tiny else args.model
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
    return model, processor, source


# ----------------------------------------------------------------------------------------------------------------
# Data: rows (image, question, answer) -> prompt + answer tokens, labels on the answer only
# ----------------------------------------------------------------------------------------------------------------


def synthetic_vqa(n: int, seed: int):
    """Synthetic scans with one question each, cycling through `SYNTHETIC_QUESTIONS`."""
    from ran_peft.data import synthetic_medical_dataset

    rows = synthetic_medical_dataset(n, seed=seed, image_size=64, task="finding")
    questions = [list(SYNTHETIC_QUESTIONS)[index % len(SYNTHETIC_QUESTIONS)] for index in range(n)]
    columns = {name: rows[name] for name in set(SYNTHETIC_QUESTIONS.values())}  # reads no image
    answers = [str(columns[SYNTHETIC_QUESTIONS[q]][index]) for index, q in enumerate(questions)]
    return rows.add_column("question", questions).add_column("answer", answers)


def load_data(args: LlavaFinetuneArguments):
    """(train, eval) datasets with `image`, `question` and `answer` columns."""
    if args.dataset == "synthetic":
        return synthetic_vqa(args.train_size, args.seed), synthetic_vqa(args.eval_size, args.seed + 1)
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


class VQACollator:
    """Rows -> `pixel_values`, `input_ids`, `attention_mask`, `labels` for a LLaVA-style model.

    Each sequence is the processor's prompt (chat template if the processor has one, image tokens already expanded
    by the processor) followed by the answer tokens and EOS; `labels` are -100 on the prompt and padding and the
    token ids on the answer, one label per input position (what RAN's generative family needs).
    """

    def __init__(self, processor: Any, max_answer_tokens: int = 64):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_answer_tokens = max_answer_tokens
        self.pad_id = next(
            (i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None), 0
        )

    def prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ]
            return self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"{image_token}\n{question}\nAnswer:"

    def _encode(self, row: dict) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
        text = self.prompt(str(row["question"]))
        bos = self.tokenizer.bos_token
        # A template that writes the BOS itself must not get a second one from the tokenizer.
        special = not (bos and text.startswith(bos))
        encoded = self.processor(
            images=[row["image"].convert("RGB")], text=[text], add_special_tokens=special, return_tensors="pt"
        )
        prompt_ids = encoded.pop("input_ids")[0].tolist()
        encoded.pop("attention_mask", None)
        eos = self.tokenizer.eos_token_id
        if eos is not None and prompt_ids and prompt_ids[-1] == eos:  # tokenizers that close every text
            prompt_ids = prompt_ids[:-1]
        answer_ids = self.tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids[: self.max_answer_tokens] + ([eos] if eos is not None else [])
        return encoded, prompt_ids, answer_ids

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self._encode(row) for row in rows]
        length = max(len(prompt) + len(answer) for _, prompt, answer in encoded)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for index, (_, prompt, answer) in enumerate(encoded):
            sequence = torch.tensor(prompt + answer, dtype=torch.long)
            input_ids[index, : len(sequence)] = sequence
            attention_mask[index, : len(sequence)] = 1
            labels[index, len(prompt) : len(sequence)] = sequence[len(prompt) :]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        # pixel_values and whatever else the processor gives per image (e.g. image_sizes), one row per sample
        for key in encoded[0][0]:
            batch[key] = torch.cat([images[key] for images, _, _ in encoded])
        return batch


def sft_rows(rows):
    """Rows (image, question, answer) in TRL's conversational prompt-completion format: the loss is on the answer."""

    def convert(row: dict) -> dict:
        question = [{"type": "image"}, {"type": "text", "text": str(row["question"])}]
        return {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": str(row["answer"])}]}],
            "images": [row["image"].convert("RGB")],
        }

    return rows.map(convert, remove_columns=rows.column_names)


# ----------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------


def train_with_sft_trainer(model, config, train, processor, settings, work_dir: Path):
    """RAN fine-tuning with TRL's SFTTrainer: `peft_config=RANConfig(...)` and `callbacks=[RANCallback()]` are all
    that differs from LoRA fine-tuning. Returns `(trainer, peft_model, train_seconds)`."""
    import time

    from trl import SFTConfig, SFTTrainer

    from ran_peft import RANCallback

    on_gpu = torch.cuda.is_available()
    arguments = SFTConfig(
        output_dir=str(work_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, settings.max_steps // 10),
        logging_steps=max(1, settings.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=on_gpu
        and torch.cuda.is_bf16_supported(),  # SFTConfig's default (bf16) fails on a CPU without it
        max_length=None,  # never cut the image tokens
        disable_tqdm=not settings.progress,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model,
        args=arguments,
        train_dataset=sft_rows(train),
        processing_class=processor,
        peft_config=config,
        callbacks=[RANCallback()],
    )
    start = time.perf_counter()
    trainer.train()
    return trainer, trainer.model, time.perf_counter() - start


def run(args: LlavaFinetuneArguments) -> dict:
    from ran_peft import PixelBox
    from ran_peft.experiments import evaluate_adapter
    from ran_peft.hub import save_adapter

    config, epsilons = check_arguments(args)
    if importlib.util.find_spec("trl") is None:
        raise UsageError("this example trains through TRL's SFTTrainer: `pip install 'ran-peft[trl]'`.")
    train, evaluation = load_data(args)
    model, processor, source = load_model_and_processor(args)
    collator = VQACollator(processor, max_answer_tokens=args.max_answer_tokens)
    pixel_box = PixelBox.from_processor(processor)
    if pixel_box is None:
        raise UsageError(f"--model={source!r}: its image processor has no image_mean/image_std.")
    config.image_mean, config.image_std = list(pixel_box.mean), list(pixel_box.std)
    config.base_model_name_or_path = source
    settings = experiment_settings(args, epsilons)
    metrics: dict[str, Any] = {
        "task": "visual question answering: teacher-forced exact match of the whole answer",
        "runs": {"before": evaluate_adapter(model, evaluation, collator, pixel_box, settings)},
        "recipe": config.recipe_dict(),
        "base_model": "tiny-random-llava" if args.tiny else args.model,
    }
    output = Path(args.output_dir)
    work_dir = Path(tempfile.mkdtemp(prefix=".ran-finetune-llava-work-"))
    try:
        trainer, ran_model, seconds = train_with_sft_trainer(
            model, config, train, processor, settings, work_dir
        )
        if not trainer.is_world_process_zero():
            return metrics
        metrics["runs"]["ran"] = evaluate_adapter(ran_model, evaluation, collator, pixel_box, settings)
        metrics["runs"]["ran"]["train_seconds"] = seconds
        metrics["attack"] = metrics["runs"]["ran"]["attack"]
        metrics["train_log"] = [entry for entry in trainer.state.log_history if "loss" in entry]
        save_adapter(ran_model, output, metrics=metrics, datasets=[args.dataset], overwrite=args.overwrite)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    for name, report in metrics["runs"].items():
        robust = ", ".join(f"@{key} {100 * value:.1f}%" for key, value in report["robust_accuracy"].items())
        print(f"{name:<7} answer accuracy: clean {100 * report['clean_accuracy']:.1f}%, {robust}")
    print(f"adapter, model card and ran_metrics.json in {output}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser(LlavaFinetuneArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
