"""How hard each synthetic downstream task is for the embedded default model, before any fine-tuning.

For every task of `synthetic_medical_dataset` (finding, modality, anatomy, laterality): chance, the prompt-based
zero-shot accuracy, and the accuracy of a linear probe on the frozen image embeddings (how much of the task the
pre-trained features already hold). This is what the choice of the default downstream task rests on.

    python benchmarks/task_difficulty.py --out task_difficulty.json [--train-size 1500] [--eval-size 500]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ran_peft.data import (
    SYNTHETIC_TASKS,
    ImageTextCollator,
    synthetic_medical_dataset,
    tokenize_class_prompts,
)
from ran_peft.representation import image_features, linear_probe_accuracy, zero_shot_accuracy


def measure(model, processor, task: str, train_size: int, eval_size: int, seed: int) -> dict:
    collator = ImageTextCollator(processor.image_processor, processor.tokenizer, mode="classification")
    rows = {
        split: synthetic_medical_dataset(size, seed=seed, image_size=64, task=task, split_name=split)
        for split, size in (("train", train_size), ("test", eval_size))
    }
    loaders = {split: DataLoader(data, batch_size=100, collate_fn=collator) for split, data in rows.items()}
    labels = {split: torch.tensor(data["label"]) for split, data in rows.items()}
    prompts = tokenize_class_prompts(processor.tokenizer, rows["train"].features["label"].names)
    features = {split: image_features(model, loader) for split, loader in loaders.items()}
    return {
        "classes": len(SYNTHETIC_TASKS[task]),
        "chance": 1 / len(SYNTHETIC_TASKS[task]),
        "zero_shot_acc": zero_shot_accuracy(model, loaders["test"], prompts),
        "linear_probe_acc": linear_probe_accuracy(
            features["train"], labels["train"], features["test"], labels["test"]
        ),
    }


def markdown(results: dict) -> str:
    lines = [
        "| task | classes | chance | zero-shot | linear probe (frozen features) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task, row in results["tasks"].items():
        lines.append(
            f"| {task} | {row['classes']} | {100 * row['chance']:.1f} | {100 * row['zero_shot_acc']:.1f} "
            f"| {100 * row['linear_probe_acc']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON results (a markdown table goes beside it)")
    parser.add_argument(
        "--model", default=None, help="folder of a CLIP-style model (default: the embedded offline model)"
    )
    parser.add_argument("--train-size", type=int, default=1500, help="rows the probe is fit on")
    parser.add_argument("--eval-size", type=int, default=500, help="rows it is scored on")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.train_size < 2 or args.eval_size < 1:
        raise SystemExit(
            f"error: --train-size={args.train_size} (>= 2) and --eval-size={args.eval_size} (>= 1)."
        )

    from transformers import AutoModel, AutoProcessor

    from ran_peft.pretrain import build_default_model

    folder = args.model or str(build_default_model())
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    started = time.perf_counter()
    results = {
        "benchmark": "task_difficulty",
        "model": args.model or "embedded default",
        "train_size": args.train_size,
        "eval_size": args.eval_size,
        "seed": args.seed,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "tasks": {
            task: measure(model, processor, task, args.train_size, args.eval_size, args.seed)
            for task in SYNTHETIC_TASKS
        },
    }
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))
    print(f"{results['seconds']:.0f} s; wrote {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
