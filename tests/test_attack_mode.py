"""The attack's mode switch: only stochastic layers and normalisation statistics change; nothing else sees a mode
flip (bitsandbytes' 4-bit CPU layers repack their weights when they do); BatchNorm statistics follow the config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tiny_models as tm
import torch
from peft import get_peft_model
from test_trainer import _args, _lora_state, _rows
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, Trainer

from ran_peft import RANCallback, RANConfig, attack_mode, deterministic_training_mode, ran_loss
from ran_peft.evaluation import evaluate_robustness
from ran_peft.pixels import PixelBox
from ran_peft.quantization import explain_four_bit_cpu_path


class _SelfAttention(nn.Module):
    """Like transformers' attention modules: the dropout probability is a float applied when `self.training`."""

    def __init__(self, attention_dropout: float):
        super().__init__()
        self.attention_dropout = attention_dropout
        self.proj = nn.Linear(4, 4)


def _mixed_model() -> nn.Module:
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.Dropout(0.1),
        nn.BatchNorm1d(4),
        _SelfAttention(0.1),
        _SelfAttention(0.0),
        nn.LayerNorm(4),
    )
    return model.train()


def test_attack_mode_switches_only_stochastic_and_normalisation_layers():
    model = _mixed_model()
    with attack_mode(model):
        modes = {name: module.training for name, module in model.named_modules()}
    assert modes == {
        "": True,
        "0": True,
        "1": False,  # dropout
        "2": False,  # running statistics
        "3": False,  # applies its own attention dropout
        "3.proj": True,
        "4": True,  # dropout probability 0: nothing random
        "4.proj": True,
        "5": True,
    }
    assert all(module.training for module in model.modules())


def test_deterministic_training_mode_restores_an_eval_model():
    model = _mixed_model().eval()
    with deterministic_training_mode(model):
        assert model[0].training and model[3].proj.training
        assert not model[1].training and not model[2].training and not model[3].training
    assert not any(module.training for module in model.modules())


# -- bitsandbytes' packed CPU weights -------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["avx512-bf16-path", "generic-cpu-path"])
def four_bit_clip(request, tmp_path, monkeypatch):
    """A tiny 4-bit CLIP on either of bitsandbytes' CPU paths, whatever this CPU has. On the AVX512-BF16 one, a forward
    in eval mode with an input that needs no gradient would repack the weight (the spy makes that an error)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules
    from transformers import BitsAndBytesConfig, CLIPModel

    case = tm.clip(batch=4)
    case.model.save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = CLIPModel.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    layers = [module for module in base.modules() if isinstance(module, bnb_modules.Linear4bit)]
    assert layers
    for layer in layers:
        layer.support_avx512bf16_for_cpu = request.param

    def repack(*args, **kwargs):
        raise AssertionError("a 4-bit layer saw eval mode and repacked its weight for inference")

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", repack)
    return case, base


@pytest.mark.parametrize(
    "recipe",
    [dict(attack_steps=2), dict(free_start=False), dict(consistency_weight=0.5)],
    ids=["two-steps", "no-free-start", "consistency"],
)
def test_four_bit_layers_never_see_eval_mode_during_ran_training(four_bit_clip, tmp_path, recipe):
    case, base = four_bit_clip
    model = get_peft_model(base, RANConfig(r=4, target_modules=case.target_modules, **recipe))
    before = _lora_state(model)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path / "run", steps=2),
        train_dataset=_rows(case),
        processing_class=tm.processor(),
        callbacks=[RANCallback()],
    )
    trainer.train()
    after = _lora_state(model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_four_bit_model_in_eval_mode_is_attacked_without_repacking(four_bit_clip):
    case, base = four_bit_clip
    base.eval()
    batch = {**case.batch, "return_loss": True}
    loader = [{key: value for key, value in batch.items() if key != "return_loss"}]
    report = evaluate_robustness(
        base, loader, pixel_box=PixelBox(tm.MEAN, tm.STD), epsilons=(4 / 255,), steps=2, check_steps=False
    )
    assert report.num_samples == 4
    assert not any(module.training for module in base.modules())  # the caller's eval mode is back


def test_four_bit_run_says_which_cpu_path_it_takes(four_bit_clip):
    from bitsandbytes.functional import has_avx512bf16

    _, base = four_bit_clip
    sentence = explain_four_bit_cpu_path(base)
    assert sentence is not None
    assert ("has AVX512-BF16" in sentence) == bool(has_avx512bf16())
    assert explain_four_bit_cpu_path(nn.Linear(2, 2)) is None


def test_importing_the_stack_shows_no_bitsandbytes_notice(tmp_path):
    code = "import ran_peft, peft\nfrom transformers import Trainer\nprint('imported')"
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr and "gemm_4bit" not in result.stderr


# -- BatchNorm statistics --------------------------------------------------------------------------------------


def _tiny_resnet_case(batch: int = 4) -> tm.TinyCase:
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    model = ResNetForImageClassification(config)
    generator = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": tm.pixels(batch, generator), "labels": torch.arange(batch) % 3}
    return tm.TinyCase(
        "resnet", model, inputs, target_modules=["convolution"], modules_to_save=["classifier"]
    )


def _batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]


@pytest.mark.parametrize("policy, passes_per_step", [("batch_only", 1), ("update_running", 2)])
def test_adversarial_pass_updates_running_statistics_as_configured(tmp_path, policy, passes_per_step):
    case = _tiny_resnet_case()
    config = RANConfig(
        r=4,
        target_modules=case.target_modules,
        modules_to_save=case.modules_to_save,
        attack_steps=2,
        adversarial_batch_statistics=policy,
    )
    model = get_peft_model(case.model, config)
    steps = 3
    trainer = Trainer(
        model=model,
        args=_args(tmp_path / "run", steps=steps),
        train_dataset=_rows(case),
        processing_class=tm.processor(),
        callbacks=[RANCallback()],
    )
    trainer.train()
    layers = _batchnorm_layers(model)
    assert layers
    # One clean training pass per step, plus the adversarial one when it folds in; the attack's passes never do.
    assert all(int(layer.num_batches_tracked) == steps * passes_per_step for layer in layers)


def test_batch_only_running_statistics_are_those_of_the_clean_pass():
    """After one step, the running statistics are exactly what a clean forward in training mode leaves."""
    statistics = []
    for use_ran in (False, True):
        case = _tiny_resnet_case()
        model = get_peft_model(
            case.model,
            RANConfig(
                r=4, target_modules=case.target_modules, modules_to_save=case.modules_to_save, attack_steps=2
            ),
        ).train()
        if use_ran:
            ran_loss(model, case.batch, model.peft_config["default"], pixel_box=PixelBox(tm.MEAN, tm.STD))
        else:
            model(**case.batch)
        statistics.append([layer.running_mean.clone() for layer in _batchnorm_layers(model)])
    for plain, ran in zip(*statistics, strict=True):
        torch.testing.assert_close(ran, plain, rtol=0, atol=0)
