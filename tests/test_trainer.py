"""RAN through the stock `transformers.Trainer` with `RANCallback`, and what stays plain LoRA afterwards."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny_models as tm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainingArguments

from ran_peft import RANCallback, RANConfig


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _rows(case, repeats=4):
    size = case.batch["pixel_values"].shape[0]
    rows = []
    for repeat in range(repeats):
        for index in range(size):
            row = {key: value[index] for key, value in case.batch.items()}
            row["pixel_values"] = row["pixel_values"] + 0.05 * repeat
            rows.append(row)
    return ListDataset(rows)


def _args(tmp_path, steps=4, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        seed=7,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**settings, **overrides})


def _lora_state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if "lora_" in name}


def test_epsilon_zero_and_no_rectification_is_exactly_lora_training(tmp_path):
    common = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], lora_dropout=0.1)
    states = []
    for use_ran in (False, True):
        torch.manual_seed(0)
        case = tm.vit(batch=4, seed=0)  # ViT with dropout: the RNG streams must match too
        if use_ran:
            config = RANConfig(
                **common,
                epsilon=0.0,
                kl_weight=0.0,
                adversarial_weight=0.5,
                image_mean=list(tm.MEAN),
                image_std=list(tm.STD),
            )
            callbacks = [RANCallback()]
        else:
            config, callbacks = LoraConfig(**common), []
        model = get_peft_model(case.model, config)
        Trainer(
            model=model,
            args=_args(tmp_path / str(use_ran), steps=5),
            train_dataset=_rows(case),
            callbacks=callbacks,
        ).train()
        states.append(_lora_state(model))
    lora, ran = states
    assert lora.keys() == ran.keys() and lora
    for name in lora:
        assert torch.equal(lora[name], ran[name]), name


def test_ran_through_the_stock_trainer_logs_its_parts_and_leaves_plain_lora(tmp_path):
    case = tm.clip(batch=4)
    config = RANConfig(r=4, target_modules=case.target_modules, consistency_weight=0.5, noise_warmup_steps=2)
    model = get_peft_model(case.model, config)
    before = _lora_state(model)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, steps=4),
        train_dataset=_rows(case),
        processing_class=tm.processor(),  # where the callback reads the pixel mean/std
        callbacks=[RANCallback()],
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged, trainer.state.log_history
    for entry in logged:
        assert {"ran/clean", "ran/adversarial", "ran/kl", "ran/consistency", "ran/epsilon"} <= set(entry)
    assert logged[0]["ran/epsilon"] < logged[-1]["ran/epsilon"] == pytest.approx(config.epsilon)
    after = _lora_state(model)
    assert any(not torch.equal(before[name], after[name]) for name in before)

    # Training is over: the forward is PEFT's own again, and inference costs what LoRA inference costs.
    assert "forward" not in model.__dict__
    lora_twin = get_peft_model(tm.clip(batch=4).model, config.to_lora_config())
    lora_twin.load_state_dict(model.state_dict())
    model.eval(), lora_twin.eval()
    inputs = {key: value for key, value in case.batch.items()}
    counts = []
    for candidate in (model, lora_twin):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            output = candidate(**inputs)
        counts.append((counter.get_total_flops(), output.logits_per_image))
    assert counts[0][0] == counts[1][0] > 0
    torch.testing.assert_close(counts[0][1], counts[1][1])


def test_callback_without_a_ran_config_or_normalisation_says_what_is_missing(tmp_path):
    case = tm.vit()
    model = get_peft_model(case.model, LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = Trainer(
        model=model, args=_args(tmp_path, steps=1), train_dataset=_rows(case), callbacks=[RANCallback()]
    )
    with pytest.raises(ValueError, match="found no RANConfig"):
        trainer.train()
    model = get_peft_model(tm.vit().model, RANConfig(r=2, target_modules=["q_proj"]))
    trainer = Trainer(
        model=model, args=_args(tmp_path, steps=1), train_dataset=_rows(case), callbacks=[RANCallback()]
    )
    with pytest.raises(ValueError, match="image processor"):
        trainer.train()


STOCK_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file
    from transformers import {model_class}
    from peft import PeftModel
    torch.set_num_threads(int(sys.argv[4]))  # the parent's thread count: same reduction order, same bits
    base = {model_class}.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    data = load_file(sys.argv[3])
    inputs = {{k[3:]: v for k, v in data.items() if k.startswith("in.")}}
    with torch.no_grad():
        output = model(**inputs)
    key = "{output_key}"
    assert torch.equal(output[key], data["out"]), (output[key] - data["out"]).abs().max()
    assert not any(name.startswith("ran_peft") for name in sys.modules), "ran_peft was imported"
    print("identical")
    """
)


@pytest.mark.parametrize(
    "name, output_key", [("clip", "logits_per_image"), ("llava", "logits"), ("vit", "logits")]
)
def test_saved_adapter_loads_in_stock_peft_without_ran_peft_with_identical_outputs(
    tmp_path, name, output_key
):
    case = tm.ALL_CASES[name]()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    case.model.save_pretrained(base_dir, safe_serialization=True)
    config = RANConfig(
        r=4,
        target_modules=case.target_modules,
        modules_to_save=case.modules_to_save,
        image_mean=list(tm.MEAN),
        image_std=list(tm.STD),
    )
    model = get_peft_model(case.model, config)
    model.train()
    from ran_peft import ran_loss

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        ran_loss(model, case.batch, config).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter_dir)
    assert sorted(os.listdir(adapter_dir)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "ran_config.json",
    ]
    model.eval()
    with torch.no_grad():
        expected = model(**case.batch)[output_key]
    tensors = {f"in.{k}": v.contiguous() for k, v in case.batch.items()} | {"out": expected.contiguous()}
    save_file(tensors, tmp_path / "io.safetensors")
    script = STOCK_RELOAD.format(model_class=type(case.model).__name__, output_key=output_key)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(base_dir),
            str(adapter_dir),
            str(tmp_path / "io.safetensors"),
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout

    restored = RANConfig.from_pretrained(str(adapter_dir))
    assert restored.recipe_dict() == config.recipe_dict()
    reloaded = PeftModel.from_pretrained(
        type(case.model).from_pretrained(base_dir), adapter_dir, config=restored
    ).eval()
    assert isinstance(reloaded.peft_config["default"], RANConfig)
    with torch.no_grad():
        assert torch.equal(reloaded(**case.batch)[output_key], expected)
    json.loads((adapter_dir / "ran_config.json").read_text())


def test_four_bit_nf4_model_trains_with_ran(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, CLIPModel

    case = tm.clip(batch=4)
    case.model.save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = CLIPModel.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    assert any("4bit" in type(module).__name__ for module in base.modules())
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, RANConfig(r=4, target_modules=case.target_modules, attack_steps=2))
    before = _lora_state(model)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path / "run", steps=3),
        train_dataset=_rows(case),
        processing_class=tm.processor(),
        callbacks=[RANCallback()],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    after = _lora_state(model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_dual_encoder_prompt_classification_honours_gradient_accumulation(tmp_path):
    """batch 4 in one step == 2 micro-batches of 2 accumulated (the Trainer's `num_items_in_batch` contract)."""
    states = []
    for batch, accumulation in ((4, 1), (2, 2)):
        case = tm.clip(batch=4, prompts=True)
        config = RANConfig(r=4, target_modules=case.target_modules, epsilon=0.0, kl_weight=0.0)
        model = get_peft_model(case.model, config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(0.05)
        args = _args(
            tmp_path / str(batch),
            steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            label_names=["labels"],
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,  # no clipping: it would hide a wrongly scaled gradient
        )
        Trainer(
            model=model,
            args=args,
            train_dataset=_rows(case, repeats=2),
            processing_class=tm.processor(),
            callbacks=[RANCallback(class_text_inputs=case.class_text_inputs)],
        ).train()
        states.append(_lora_state(model))
    assert any((state != 0.05).any() for name, state in states[0].items() if "lora_B" in name)  # it trained
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-4, atol=1e-4)
