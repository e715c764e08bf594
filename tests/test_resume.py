"""A RAN run stopped at a checkpoint and resumed ends with the same adapter as an uninterrupted run.

What must survive the restart: the noise warm-up (`RANCallback` takes the step from the Trainer's restored
`global_step`), the RNG streams of the random start and of dropout (the Trainer saves and restores them), the
optimiser and scheduler. RAN keeps no other state between steps.
"""

import pytest
import tiny_models as tm
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from ran_peft import RANCallback, RANConfig


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class StopAt(TrainerCallback):
    """Stop the run after step `step` (after its checkpoint is written), as a crash or preemption would."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dataset():
    generator = torch.Generator().manual_seed(5)
    pixels = tm.pixels(24, generator)
    labels = torch.randint(0, 3, (24,), generator=generator)
    return ListDataset([{"pixel_values": pixels[i], "labels": labels[i]} for i in range(24)])


def _run(output_dir, *, stop_at=None, resume=None):
    torch.manual_seed(0)
    case = tm.vit(batch=2)  # hidden dropout 0.1 and LoRA dropout: the RNG streams matter
    config = RANConfig(
        r=4,
        lora_dropout=0.1,
        target_modules=case.target_modules,
        modules_to_save=case.modules_to_save,
        attack_steps=2,
        noise_warmup_steps=10,  # still ramping when the run stops at step 3
        image_mean=list(tm.MEAN),
        image_std=list(tm.STD),
    )  # the default random start: the RNG state matters
    model = get_peft_model(case.model, config)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        seed=7,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [RANCallback()] + ([StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    return trainer, weights, logs


def test_resumed_run_ends_with_the_same_adapter_bit_for_bit(tmp_path, one_thread):
    _, straight, straight_logs = _run(tmp_path / "straight")

    stopped, _, _ = _run(tmp_path / "interrupted", stop_at=3)
    assert stopped.state.global_step == 3
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    assert (checkpoint / "rng_state.pth").is_file() and (checkpoint / "trainer_state.json").is_file()

    resumed_trainer, resumed, resumed_logs = _run(tmp_path / "interrupted", resume=str(checkpoint))
    assert resumed_trainer.state.global_step == 6
    for step in (4, 5, 6):
        # The warm-up continued where it stopped (epsilon of step k is config.epsilon * (k + 1) / 10 ...).
        assert resumed_logs[step]["ran/epsilon"] == straight_logs[step]["ran/epsilon"]
        assert resumed_logs[step]["loss"] == straight_logs[step]["loss"]
    assert straight_logs[4]["ran/epsilon"] < straight_logs[6]["ran/epsilon"]  # ... and was still ramping
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
