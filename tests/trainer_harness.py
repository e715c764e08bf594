"""Two steps of the stock `transformers.Trainer` with `RANCallback` on one prepared batch, recording every attack:
what the architecture tests and the registry sweep both run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import ran_peft.training as training
from ran_peft import PixelIndependentWarning, RANCallback, RANConfig


class SameBatch(torch.utils.data.Dataset):
    """The whole prepared batch as one item (the collator unwraps it), so padded multi-image batches stay as the
    processor made them."""

    def __init__(self, batch: dict[str, Any], steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batch


def training_arguments(output_dir: str, label_names: list[str] | None = None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=1,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=label_names,
    )


@dataclass
class RecordedAttack:
    clean: torch.Tensor
    adversarial: torch.Tensor
    box: Any  # the BatchPixelBox RAN placed
    epsilon: float


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor to compare between two models' outputs: logits, else similarity logits, else the loss."""
    for name in ("logits", "logits_per_image", "loss"):
        value = getattr(output, name, None)
        if torch.is_tensor(value):
            return value
    raise AssertionError(f"no comparable tensor in {type(output).__name__}")


def train_two_steps(
    model: torch.nn.Module,
    batch: dict[str, Any],
    processor: Any,
    config: RANConfig,
    output_dir: str,
    monkeypatch: Any,
    label_names: list[str] | None = None,
    pixel_independent: str = "error",
) -> tuple[torch.nn.Module, Trainer, list[RecordedAttack]]:
    """Two stock-Trainer steps with RANCallback; returns the PEFT model, the trainer and the attacks seen.

    `pixel_independent` is the warnings filter action for `PixelIndependentWarning` ("error" by default: a model
    whose loss ignores the pixels cannot show the budget)."""
    peft_model = get_peft_model(model, config)
    attacks: list[RecordedAttack] = []
    perturb = training.pgd_perturb

    def recording_perturb(loss_fn, pixel_values, box, budget, **kwargs):
        adversarial = perturb(loss_fn, pixel_values, box, budget, **kwargs)
        attacks.append(
            RecordedAttack(pixel_values.detach().clone(), adversarial.detach().clone(), box, budget.epsilon)
        )
        return adversarial

    monkeypatch.setattr(training, "pgd_perturb", recording_perturb)
    trainer = Trainer(
        model=peft_model,
        args=training_arguments(output_dir, label_names),
        train_dataset=SameBatch(batch, 2),
        data_collator=lambda items: items[0],
        processing_class=processor,
        callbacks=[RANCallback()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter(pixel_independent, PixelIndependentWarning)
        trainer.train()
    return peft_model, trainer, attacks
