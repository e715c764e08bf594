"""RAN under TRL's SFTTrainer: the two-line change from LoRA trains RAN on generative VLMs, logs its loss parts,
saves an adapter stock peft reloads, and gives the stock Trainer's adapter on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed: `pip install 'ran-peft[trl]'`")

import tiny_vlms  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import ran_peft.trl as ran_trl  # noqa: E402
from ran_peft import RANCallback, RANConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def _sft_args(tmp_path, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        bf16=False,  # SFTConfig defaults to bf16, which a CPU without it refuses
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        max_length=None,  # never cut the image tokens
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def _config() -> RANConfig:
    return RANConfig(r=4, target_modules=TARGETS, epsilon=8 / 255, noise_warmup_steps=0)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


STOCK_RELOAD = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file
    from transformers import {model_class}
    from peft import PeftModel
    torch.set_num_threads(1)
    model = PeftModel.from_pretrained({model_class}.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
    data = load_file(sys.argv[3])
    with torch.no_grad():
        logits = model(**{{k[3:]: v for k, v in data.items() if k.startswith("in.")}}).logits
    assert torch.allclose(logits, data["out"], atol=1e-5, rtol=0), (logits - data["out"]).abs().max()
    assert not any(name.startswith("ran_peft") for name in sys.modules), "ran_peft was imported"
    print("identical")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_sft_trainer_with_ran_config_trains_logs_parts_and_reloads_in_stock_peft(tmp_path, family):
    model, processor = tiny_vlms.GENERATIVE[family]()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir, safe_serialization=True)
    rows = tiny_vlms.vqa_rows(4)
    trainer = SFTTrainer(  # exactly the LoRA call, with RANConfig for LoraConfig and the callback added
        model,
        args=_sft_args(tmp_path),
        train_dataset=rows,
        processing_class=processor,
        peft_config=_config(),
        callbacks=[RANCallback()],
    )
    before = _adapter(trainer.model)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        for part in ("ran/clean", "ran/adversarial", "ran/kl", "ran/epsilon"):
            assert part in entry, (part, entry)
        assert entry["ran/adversarial"] != pytest.approx(
            entry["ran/clean"], abs=1e-6
        )  # the attack changed the loss
        assert entry["ran/epsilon"] == pytest.approx(8 / 255)
        assert "mean_token_accuracy" in entry  # TRL's own metrics still come
    after = _adapter(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)

    trainer.model.save_pretrained(adapter_dir)
    batch = trainer.data_collator([rows[0], rows[1]])
    batch.pop("labels")
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
    tensors = {f"in.{k}": v.contiguous() for k, v in batch.items()} | {"out": expected.contiguous()}
    save_file(tensors, tmp_path / "io.safetensors")
    script = STOCK_RELOAD.format(model_class=type(model).__name__)
    result = subprocess.run(
        [sys.executable, "-c", script, str(base_dir), str(adapter_dir), str(tmp_path / "io.safetensors")],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout


@pytest.mark.slow
def test_sft_trainer_with_ran_config_trains_qwen2_vl(tmp_path):
    model, processor = tiny_vlms.qwen2_vl()
    trainer = SFTTrainer(
        model,
        args=_sft_args(tmp_path, max_steps=1),
        train_dataset=tiny_vlms.vqa_rows(2),
        processing_class=processor,
        peft_config=_config(),
        callbacks=[RANCallback()],
    )
    trainer.train()  # flattened patch rows with image_grid_thw: the pixel layout places them
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["ran/adversarial"] != pytest.approx(logged[0]["ran/clean"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, recipe",
    [("llava", {}), ("gemma3", {}), ("llava", {"free_replay": 2})],
    ids=["llava", "gemma3", "llava-free2"],
)
def test_sft_trainer_gives_the_stock_trainers_adapter_on_the_same_batches(tmp_path, family, recipe):
    """Under gradient accumulation (2 micro-batches of uneven token counts per step), SFTTrainer and the stock
    Trainer, fed the same batches from TRL's collator, end with the same adapter. Free AT's replays (a replayed
    batch's loss returned for a new batch's labels) too."""
    rows = tiny_vlms.vqa_rows(8)
    args = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    adapters = {}
    for which in ("sft", "stock"):
        model, processor = tiny_vlms.GENERATIVE[family]()
        torch.manual_seed(0)
        peft_model = get_peft_model(model, replace(_config(), **recipe))
        sft = SFTTrainer(
            peft_model,
            args=_sft_args(tmp_path / which, **args),
            train_dataset=rows,
            processing_class=processor,
            callbacks=[RANCallback()],
        )
        if which == "sft":
            trainer = sft
        else:
            trainer = Trainer(
                model=peft_model,
                args=TrainingArguments(
                    output_dir=str(tmp_path / "stock"),
                    learning_rate=1e-2,
                    report_to=[],
                    save_strategy="no",
                    seed=0,
                    remove_unused_columns=False,  # the collator reads `messages` and `images`
                    logging_steps=1,
                    **args,
                ),
                train_dataset=rows,
                data_collator=sft.data_collator,
                processing_class=processor,
                callbacks=[RANCallback()],
            )
        trainer.train()
        adapters[which] = _adapter(peft_model)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        adapters[which + "_losses"] = losses
        if which == "sft":
            logged = [entry for entry in trainer.state.log_history if "loss" in entry]
            assert all("mean_token_accuracy" in entry for entry in logged)  # TRL's metrics, replays included
            if recipe:
                assert any("ran/kl" in entry for entry in logged)  # an adversarial replay ran
    for name, value in adapters["stock"].items():
        torch.testing.assert_close(adapters["sft"][name], value, atol=1e-5, rtol=1e-4)
    trained_b = [value for name, value in adapters["stock"].items() if "lora_B" in name]
    assert any(value.abs().max() > 1e-4 for value in trained_b)  # LoRA B starts at zero: training moved it
    assert adapters["sft_losses"] == pytest.approx(adapters["stock_losses"], rel=1e-4)


def test_fused_lm_head_output_gives_back_the_loss_under_trls_normalisation():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])  # 4 counted next-token labels
    logits = torch.randn(2, 4, 10)
    loss = torch.tensor(2.5, requires_grad=True)
    out = ran_trl.fused_lm_head_output(loss, logits, labels)
    assert int(out.label_mask.sum()) == 4
    trl_loss = -out.log_probs.sum() / out.label_mask.sum()  # SFTTrainer without num_items_in_batch
    assert float(trl_loss.detach()) == pytest.approx(2.5)
    trl_loss.backward()
    assert float(loss.grad) == pytest.approx(1.0)
    # With num_items_in_batch (gradient accumulation), RAN's loss is already over that count: TRL divides by it again.
    out = ran_trl.fused_lm_head_output(torch.tensor(0.5), logits, labels, num_items_in_batch=10)
    assert float(-out.log_probs.sum() / 10) == pytest.approx(0.5)
    scored = logits[:, :-1][out.label_mask]
    assert torch.equal(out.is_top1[out.label_mask], scored.argmax(-1).eq(labels[:, 1:][out.label_mask]))
    assert torch.all(out.entropy[~out.label_mask] == 0) and torch.all(out.entropy[out.label_mask] > 0)


def test_fused_lm_head_output_reads_the_counted_rows_ran_keeps_as_it_reads_full_logits():
    """RAN keeps only a generative VLM's answer rows past the clean pass: TRL's metrics come out the same."""
    from ran_peft.training import RANOutput

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    logits = torch.randn(2, 4, 10)
    full = ran_trl.fused_lm_head_output(torch.tensor(1.0), logits, labels)
    rows = logits[:, :-1][labels[:, 1:].ne(-100)]
    kept = ran_trl.fused_lm_head_output(torch.tensor(1.0), RANOutput(counted_logits=rows), labels)
    assert torch.equal(kept.entropy, full.entropy) and torch.equal(kept.is_top1, full.is_top1)
    with pytest.raises(ValueError, match="scored logit rows"):
        ran_trl.fused_lm_head_output(torch.tensor(1.0), RANOutput(counted_logits=rows[:2]), labels)


def test_unsupported_trl_version_says_what_to_do():
    with pytest.raises(ran_trl.UnsupportedTRLVersionError) as error:
        ran_trl.check_trl_version("0.19.1")
    message = str(error.value)
    assert "trl==0.19.1" in message and "trl>=1.16,<2" in message and "ran-peft[trl]" in message
    assert "transformers.Trainer" in message
    assert ran_trl.check_trl_version("1.16.0") == "1.16.0"
    with pytest.raises(ran_trl.UnsupportedTRLVersionError, match="trl==2.0.0"):
        ran_trl.check_trl_version("2.0.0")


@pytest.mark.slow
def test_sft_trainer_under_an_unsupported_trl_stops_at_the_first_step(tmp_path, monkeypatch):
    monkeypatch.setattr(ran_trl, "version", lambda name: "0.19.1")
    model, processor = tiny_vlms.llava()
    trainer = SFTTrainer(
        model,
        args=_sft_args(tmp_path, max_steps=1),
        train_dataset=tiny_vlms.vqa_rows(2),
        processing_class=processor,
        peft_config=_config(),
        callbacks=[RANCallback()],
    )
    with pytest.raises(ran_trl.UnsupportedTRLVersionError, match="trl==0.19.1"):
        trainer.train()
