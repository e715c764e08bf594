"""Train a tiny ConvNext with RAN through the stock Trainer, in one process or under `torchrun`, and save the result.

`tests/test_distributed.py` runs it under `torchrun` (2 CPU processes, gloo) and calls `train` in-process for the
single-process reference: the same global batch and seed must give the same adapter. Rank 0 writes
`<out>/weights.safetensors` (the trainable weights) and every rank `<out>/report-rank<r>.json` (the dataset rows it
saw per micro-batch, the logged losses and what DDP's reducer all-reduced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/, for tiny_models

import tiny_models as tm  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402

from ran_peft import RANCallback, RANConfig  # noqa: E402

ROWS = 32


class RowDataset(torch.utils.data.Dataset):
    """Distinct rows, each with an id that the collator records and drops."""

    def __init__(self):
        generator = torch.Generator().manual_seed(11)
        self.pixels = tm.pixels(ROWS, generator)
        self.labels = torch.randint(0, 3, (ROWS,), generator=generator)

    def __len__(self):
        return ROWS

    def __getitem__(self, index):
        return {"row": index, "pixel_values": self.pixels[index], "labels": self.labels[index]}


class RecordingCollator:
    def __init__(self):
        self.batches: list[list[int]] = []

    def __call__(self, rows):
        self.batches.append([row["row"] for row in rows])
        return {
            "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
            "labels": torch.stack([row["labels"] for row in rows]),
        }


class CountAllReduces(TrainerCallback):
    """Install a DDP communication hook that counts the gradient all-reduces (and their sizes) of the reducer."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref = trainer_ref
        self.calls: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer_ref[0].model_wrapped
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(process_group, bucket):
            self.calls.append(bucket.buffer().numel())
            return allreduce_hook(process_group, bucket)

        wrapped.register_comm_hook(None, counting_hook)


def build_model(architecture: str = "convnext", attack_steps: int = 2, recipe: dict | None = None):
    torch.manual_seed(0)
    if architecture == "convnext":
        case = tm.convnext(batch=2, seed=0)  # ConvNext has no dropout
    else:  # ViT supports activation checkpointing (ConvNext does not); its dropout is turned off here
        case = tm.vit(batch=2, seed=0)
        vit_config = ViTConfig(
            **tm._VISION, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        torch.manual_seed(0)
        case.model = ViTForImageClassification(vit_config)
    config = RANConfig(
        r=4,
        lora_dropout=0.0,
        target_modules=case.target_modules,
        modules_to_save=case.modules_to_save,
        attack_steps=attack_steps,
        random_start=False,  # per-rank random draws could not match one process's draw over the global batch
        epsilon=8 / 255,
        kl_weight=1.0,
        image_mean=list(tm.MEAN),
        image_std=list(tm.STD),
        **(recipe or {}),
    )
    model = get_peft_model(case.model, config)
    with (
        torch.no_grad()
    ):  # LoRA B starts at 0; give it values (the same in every process) so A gets gradients too
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().float().contiguous().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def train(
    out: str,
    *,
    architecture: str = "convnext",
    per_device_batch: int = 4,
    accumulation: int = 1,
    steps: int = 3,
    activation_checkpointing: str = "off",
    fsdp: bool = False,
    find_unused_parameters: bool | None = None,
    recipe: dict | None = None,
) -> dict:
    model = build_model(architecture, recipe=recipe)
    extra = {}
    if activation_checkpointing != "off":
        extra["gradient_checkpointing"] = True
        if activation_checkpointing == "reentrant":
            extra["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    if fsdp:
        extra["fsdp"] = "full_shard"
        extra["fsdp_config"] = {"use_orig_params": True}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        extra["ddp_backend"] = "gloo"
        extra["ddp_find_unused_parameters"] = find_unused_parameters
    collator = RecordingCollator()
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        max_steps=steps,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        optim="sgd",  # plain SGD: the update is proportional to the gradient, so a scale error shows
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=7,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **extra,
    )
    trainer_ref: list = []
    counter = CountAllReduces(trainer_ref)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RowDataset(),
        data_collator=collator,
        callbacks=[RANCallback(), counter],
    )
    trainer_ref.append(trainer)
    trainer.train()
    rank = trainer.args.process_index
    report = {
        "world_size": trainer.args.world_size,
        "batches": collator.batches,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "all_reduce_sizes": counter.calls,
        "wrapped": type(trainer.model_wrapped).__name__,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp": bool(trainer.is_fsdp_enabled),
        "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"report-rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    if fsdp:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        state = {
            name: tensor for name, tensor in state.items() if "lora_" in name or "modules_to_save" in name
        }
    else:
        state = trainable_state(model)
    if rank == 0:
        save_file(
            {k: v.float().contiguous() for k, v in state.items()}, os.path.join(out, "weights.safetensors")
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--architecture", choices=["convnext", "vit"], default="convnext")
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--activation-checkpointing", choices=["off", "default", "reentrant"], default="off")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--find-unused-parameters", choices=["default", "true", "false"], default="default")
    parser.add_argument("--recipe", default="{}", help="RANConfig fields over the script's own, as JSON")
    cli = parser.parse_args()
    find_unused = {"default": None, "true": True, "false": False}[cli.find_unused_parameters]
    train(
        cli.out,
        architecture=cli.architecture,
        per_device_batch=cli.per_device_batch,
        accumulation=cli.accumulation,
        steps=cli.steps,
        activation_checkpointing=cli.activation_checkpointing,
        fsdp=cli.fsdp,
        find_unused_parameters=find_unused,
        recipe=json.loads(cli.recipe),
    )
    if torch.distributed.is_initialized():
        # Without this, gloo's threads can still be running when the interpreter exits: `terminate called without
        # an active exception` (SIGABRT) after training has finished and every file is written, in ~1 run of 6.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
