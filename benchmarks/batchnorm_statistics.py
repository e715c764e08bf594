"""What RAN's adversarial training pass should do to BatchNorm running statistics, measured.

A tiny ResNet (BatchNorm after every convolution) is pre-trained on the synthetic `modality` task, then fine-tuned
with a RAN adapter (LoRA on the convolutions, a new classifier head) on `anatomy`, once per policy of
`RANConfig.adversarial_batch_statistics`:
- `batch_only`: the adversarial pass normalises with its own batch statistics, running statistics come from the
  clean pass alone;
- `update_running`: the adversarial batch is folded into the running statistics as well.
Both are scored on held-out rows: clean accuracy and robust accuracy under PGD with restarts (the project's
evaluation attack, named in the JSON). Usage: `python benchmarks/batchnorm_statistics.py --out results.json`.
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of the output)

# isort: split

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

from ran_peft import RANCallback, RANConfig, evaluate_robustness
from ran_peft.data import synthetic_medical_dataset
from ran_peft.pixels import PixelBox

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
POLICIES = ("batch_only", "update_running")


class TensorRows(torch.utils.data.Dataset):
    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def tensors(task: str, rows: int, seed: int, split: str, image_size: int) -> TensorRows:
    dataset = synthetic_medical_dataset(rows, seed=seed, task=task, split_name=split, image_size=image_size)
    pixels = np.stack(
        [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in dataset["image"]]
    )
    normalised = (
        torch.from_numpy(pixels).permute(0, 3, 1, 2) - torch.tensor(MEAN).view(3, 1, 1)
    ) / torch.tensor(STD).view(3, 1, 1)
    return TensorRows(normalised.contiguous(), torch.tensor(dataset["label"]))


def arguments(out: Path, steps: int, seed: int, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def pretrain(args, work: Path) -> Path:
    """A small BatchNorm backbone, trained in full (no adapter) on the upstream task."""
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        num_labels=4,
    )
    model = ResNetForImageClassification(config)
    data = tensors("modality", args.pretrain_rows, 0, "train", args.image_size)
    Trainer(
        model=model, args=arguments(work / "pretrain", args.pretrain_steps, 0, 3e-3), train_dataset=data
    ).train()
    path = work / "backbone"
    model.save_pretrained(path)
    return path


def fine_tune(backbone: Path, policy: str, seed: int, train: TensorRows, args, work: Path) -> dict:
    torch.manual_seed(seed)
    model = ResNetForImageClassification.from_pretrained(backbone, num_labels=5, ignore_mismatched_sizes=True)
    config = RANConfig(
        r=8,
        target_modules=["convolution"],
        modules_to_save=["classifier"],
        image_mean=list(MEAN),
        image_std=list(STD),
        adversarial_batch_statistics=policy,
    )
    model = get_peft_model(model, config)
    trainer = Trainer(
        model=model,
        args=arguments(work / f"{policy}-{seed}", args.steps, seed, 2e-3),
        train_dataset=train,
        callbacks=[RANCallback()],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    evaluation = tensors("anatomy", args.eval_rows, 1, "test", args.image_size)
    loader = torch.utils.data.DataLoader(evaluation, batch_size=64)
    report = evaluate_robustness(
        model,
        loader,
        pixel_box=PixelBox(MEAN, STD),
        epsilons=(1 / 255, 4 / 255),
        steps=args.eval_steps,
        restarts=args.eval_restarts,
        seed=seed,
    )
    return {"policy": policy, "seed": seed, "train_seconds": round(seconds, 1), **report.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-rows", type=int, default=2000)
    parser.add_argument("--train-rows", type=int, default=1500)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-restarts", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/batchnorm_statistics"))
    args = parser.parse_args()

    started = time.perf_counter()
    backbone = pretrain(args, args.work_dir)
    train = tensors("anatomy", args.train_rows, 0, "train", args.image_size)
    runs = [
        fine_tune(backbone, policy, seed, train, args, args.work_dir)
        for seed in args.seeds
        for policy in POLICIES
    ]
    summary = {}
    for policy in POLICIES:
        mine = [run for run in runs if run["policy"] == policy]
        summary[policy] = {
            "clean_mean": statistics.mean(run["clean_accuracy"] for run in mine),
            **{
                f"robust_{key}_mean": statistics.mean(run["robust_accuracy"][key] for run in mine)
                for key in mine[0]["robust_accuracy"]
            },
        }
    result = {
        "setup": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "attack": runs[0]["attack"],
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
