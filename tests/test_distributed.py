"""RAN under DDP (2 CPU processes, gloo), with gradient accumulation and activation checkpointing.

The attack and the free start take input gradients with `torch.autograd.grad`, which never runs the parameters'
`AccumulateGrad` nodes: DDP's reducer hooks do not fire, so the only gradient all-reduce of a step is the one of the
final `loss.backward()`, in which every trainable parameter gets its gradient exactly once.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from ran_peft import PixelBox, RANConfig, ran_loss

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
# Observed: 4e-8 (float32 sums in another order: two ranks' halves averaged by all-reduce vs one batch of 4).
DDP_TOLERANCE = 1e-5


def _script():
    spec = importlib.util.spec_from_file_location("ddp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    # Two OpenMP threads on a shared 2-core machine can make tiny ops ~100x slower; one thread is what torchrun uses.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _assert_same_weights(reference, other, tolerance):
    assert reference.keys() == other.keys() and reference
    worst = max((reference[name] - other[name]).abs().max().item() for name in reference)
    assert worst <= tolerance, worst
    return worst


@pytest.mark.slow
def test_two_ddp_processes_with_accumulation_match_one_process(tmp_path, one_thread):
    # 2 processes x per-device batch 1 x 2 accumulation steps = one process with batch 4: the same global batch.
    port = _free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(SCRIPT), "--out", str(tmp_path / "ddp"),
        "--per-device-batch", "1", "--accumulation", "2",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    ddp_weights = load_file(tmp_path / "ddp" / "weights.safetensors")
    reports = [json.loads((tmp_path / "ddp" / f"report-rank{rank}.json").read_text()) for rank in (0, 1)]

    script = _script()
    single = script.train(str(tmp_path / "single"), per_device_batch=4, accumulation=1)
    single_weights = load_file(tmp_path / "single" / "weights.safetensors")
    initial = script.trainable_state(script.build_model())

    # The same rows made each optimiser step's global batch (micro-batches interleave over the ranks).
    steps = len(single["losses"])
    for step in range(steps):
        global_rows = {row for report in reports for batch in report["batches"][2 * step : 2 * step + 2]
                       for row in batch}  # fmt: skip
        assert global_rows == set(single["batches"][step])
    for report in reports:
        assert report["world_size"] == 2
        assert report["losses"] == pytest.approx(single["losses"], abs=1e-5)
        # One all-reduce of every trainable weight per optimiser step: none for the attack, none for the free
        # start's parameter gradients, none for the first accumulation micro-batch.
        assert report["all_reduce_sizes"] == [report["trainable_numel"]] * steps

    _assert_same_weights(single_weights, ddp_weights, DDP_TOLERANCE)
    moved = max((single_weights[name] - initial[name]).abs().max().item() for name in initial)
    assert moved > 100 * DDP_TOLERANCE  # the comparison is not between two untrained adapters


# The light-weight recipes skip or shrink the attack, replay batches or carry perturbations: each step still ends in
# exactly one all-reduce of every trainable weight.
LIGHT_WEIGHT_RECIPES = {
    "every-2nd-step, boundary half, carried": {
        "attack_every": 2,
        "adversarial_fraction": 0.5,
        "carry_perturbations": True,
    },
    "free replay": {"free_replay": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(LIGHT_WEIGHT_RECIPES))
def test_light_weight_recipes_keep_one_all_reduce_per_step_under_ddp(tmp_path, one_thread, recipe):
    port = _free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(SCRIPT), "--out", str(tmp_path / "ddp"),
        "--per-device-batch", "2", "--accumulation", "2", "--steps", "4",
        "--recipe", json.dumps(LIGHT_WEIGHT_RECIPES[recipe]),
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / "ddp" / f"report-rank{rank}.json").read_text())
        assert report["world_size"] == 2 and len(report["losses"]) == 4
        assert report["all_reduce_sizes"] == [report["trainable_numel"]] * 4


def test_gradient_accumulation_matches_one_big_batch(tmp_path, one_thread):
    script = _script()
    script.train(str(tmp_path / "big"), per_device_batch=4, accumulation=1, steps=2)
    script.train(str(tmp_path / "accumulated"), per_device_batch=2, accumulation=2, steps=2)
    big = load_file(tmp_path / "big" / "weights.safetensors")
    accumulated = load_file(tmp_path / "accumulated" / "weights.safetensors")
    _assert_same_weights(big, accumulated, DDP_TOLERANCE)


def test_activation_checkpointing_trains_the_same_adapter(tmp_path, one_thread):
    """transformers 5 checkpoints without reentrancy by default, which `torch.autograd.grad` on inputs supports."""
    script = _script()
    script.train(str(tmp_path / "plain"), architecture="vit", steps=2)
    script.train(
        str(tmp_path / "checkpointed"), architecture="vit", steps=2, activation_checkpointing="default"
    )
    plain = load_file(tmp_path / "plain" / "weights.safetensors")
    checkpointed = load_file(tmp_path / "checkpointed" / "weights.safetensors")
    assert _assert_same_weights(plain, checkpointed, 0.0) == 0.0  # recomputation is bitwise on CPU


def test_reentrant_checkpointing_fails_with_the_setting_to_use(tmp_path, one_thread):
    with pytest.raises(RuntimeError, match=r'activation_checkpointing_kwargs=\{"use_reentrant": False\}'):
        _script().train(
            str(tmp_path / "reentrant"), architecture="vit", steps=1, activation_checkpointing="reentrant"
        )


def test_free_start_and_attack_leave_grad_untouched_and_each_weight_gets_one_accumulation(one_thread):
    """What DDP relies on: `.grad` is written once per weight per backward, and only by `loss.backward()`."""
    case = tm.convnext()
    config = RANConfig(r=4, target_modules=case.target_modules, modules_to_save=case.modules_to_save,
                       attack_steps=3, kl_weight=1.0)  # fmt: skip
    model = get_peft_model(case.model, config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    accumulations = {id(p): 0 for p in trainable}
    for parameter in trainable:
        parameter.register_post_accumulate_grad_hook(
            lambda p: accumulations.__setitem__(id(p), accumulations[id(p)] + 1)
        )
    output = ran_loss(model, case.batch, config, pixel_box=PixelBox(tm.MEAN, tm.STD))
    assert all(p.grad is None for p in trainable)  # the free start and 3 attack steps wrote no `.grad`
    assert set(accumulations.values()) == {0}
    output.loss.backward()
    assert set(accumulations.values()) == {1}  # DDP's reducer would mark each weight ready exactly once


@pytest.mark.skipif(
    tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 7),
    reason="torch < 2.7 cannot run FSDP2 on a CPU (its CPU stream has no `record_event`)",
)
def test_fsdp2_fully_sharded_model_trains_without_free_start_and_refuses_it_clearly():
    script = Path(__file__).parent / "scripts" / "fsdp2_train.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp2 ok" in result.stdout
