"""`benchmarks/gpu_check.py` without a GPU: one line and exit 0; its kernel checks, run on CPU with Triton
interpreted, pass on the real kernels and catch a wrong one. And `benchmarks/vlm_cost.py` on a micro VLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu_check measures for real")
def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not out.exists()


CHECKS_ON_CPU = """
import json, sys
sys.argv = ["gpu_check"]
import importlib.util
spec = importlib.util.spec_from_file_location("gpu_check", {path!r})
gpu_check = importlib.util.module_from_spec(spec); spec.loader.exec_module(gpu_check)
import ran_peft.kernels.rectify as kernels
if {break_kl}:
    reference = kernels.rectification_kl_reference
    kernels.rectification_kl_triton = lambda c, a, m, detach_clean: reference(c, a * 1.01, m, detach_clean=detach_clean)
records = gpu_check.check_pgd("cpu", shapes=[(2, 3, 5, 7)]) + gpu_check.check_kl(
    "cpu", cases=[((2, 3, 129), "partial"), ((4, 7), "all_masked")]
)
print(json.dumps(records))
"""


def _checks_on_cpu(break_kl: bool) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("RAN_PEFT_KERNELS", None)
    code = CHECKS_ON_CPU.format(path=str(GPU_CHECK), break_kl=break_kl)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gpu_check_kernel_checks_pass_on_the_kernels_and_fail_on_a_wrong_one():
    pytest.importorskip("triton")
    records = _checks_on_cpu(break_kl=False)
    kernels = {record["kernel"] for record in records}
    assert kernels == {
        "pgd_step_triton",
        "pgd_random_start_triton",
        "rectification_kl_triton",
        "rectification_kl_chunked",
    }
    assert all(record["passed"] for record in records), [r for r in records if not r["passed"]]
    broken = _checks_on_cpu(break_kl=True)
    failed = {(r["kernel"], tuple(r["shape"]), r["mask"]) for r in broken if not r["passed"]}
    # Every counted-row case of the wrong KL is caught; the all-masked case is 0 whatever the logits.
    assert {kernel for kernel, _, _ in failed} == {"rectification_kl_triton"}
    assert {(shape, mask) for _, shape, mask in failed} == {((2, 3, 129), "partial")}


def _load_vlm_cost():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ran_benchmark_vlm_cost", ROOT / "benchmarks" / "vlm_cost.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _micro_shape(vlm_cost):
    return vlm_cost.VLMShape(
        vocab=512,
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        vision_hidden=32,
        vision_layers=1,
        image_size=28,
        patch=14,
        sequence=12,
        answer_tokens=4,
        batch=2,
    )


@pytest.mark.slow
def test_vlm_cost_measures_every_case_in_a_fresh_process():
    vlm_cost = _load_vlm_cost()
    shape = _micro_shape(vlm_cost)
    results = vlm_cost.measure(shape, steps=1, warmup=0, rounds=1, device="cpu", log=lambda *a, **k: None)
    assert set(results["peak_mib"]) == set(vlm_cost.RECIPES)
    assert results["vlm_ran_over_lora_peak_memory_ratio"] > 0
    assert results["vlm_ran_over_lora_step_ratio"] > 0
    assert set(results["ratios_to_lora"]) == set(results["peak_mib"])
    assert results["ratios_to_lora"]["lora"]["step_over_lora"] == 1.0
    assert results["vlm_ran_vision_over_lora_step_ratio"] > 0
    assert results["model"]["image_tokens"] == 4
    assert all(len(run["step_seconds"]) == 1 for runs in results["runs"].values() for run in runs)


def test_vlm_cost_runs_the_chosen_recipes_beside_lora():
    vlm_cost = _load_vlm_cost()
    results = vlm_cost.measure(
        _micro_shape(vlm_cost), steps=1, warmup=0, rounds=1, device="cpu", log=lambda *a, **k: None,
        recipes=("ran_vision_task",),
    )  # fmt: skip
    assert set(results["peak_mib"]) == set(results["recipes"]) == {"lora", "ran_vision_task"}
    assert results["vlm_ran_vision_task_over_lora_step_ratio"] > 0
    assert "vlm_ran_over_lora_step_ratio" not in results and set(results["goals"]) == {"ran_vision_task"}
