"""Everything that needs a GPU, in one command: the Triton kernels run for real against their references (on the
shapes the tests use), their speed and memory against the PyTorch paths (`benchmarks/kernel_speed.py`), the 4-bit vs
fp32 peak memory of a RAN step (bitsandbytes' CUDA kernels) and RAN's step/memory ratios against LoRA on a
LLaVA-style VLM (`benchmarks/vlm_cost.py`). One JSON.

    python benchmarks/gpu_check.py --out gpu.json [--quick]

Without a CUDA device it prints one line saying so and exits 0. Exit status 1 when a kernel disagrees with its
reference (the JSON is written all the same); a part that crashes is recorded under `errors` and the rest still runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

NO_CUDA_MESSAGE = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False), so nothing was measured and no JSON written; "
    "run it on a machine with an NVIDIA GPU."
)

# The pixel normalisation, budgets and shapes of tests/test_kernels_pgd.py and tests/test_kernels_rectify.py.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
EPS, STEP = 8 / 255, 2 / 255
PGD_SHAPES = [(3, 5, 7), (2, 3, 17, 19), (2, 2, 3, 8, 8), (32, 3, 224, 224)]
KL_CASES = [
    ((2, 3, 1000), "partial"),
    ((5, 4099), "none"),
    ((4, 7), "all_masked"),
    ((3, 2, 129), "partial"),
    ((512, 32000), "partial"),  # a generative VLM's answer rows over a 32k vocabulary
    ((64, 128000), "partial"),  # several vocabulary blocks per row
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (rtol, atol), as in the tests: float32 is rounding only; half types one unit in the last stored place.
PGD_TOLERANCE = {"float32": (1e-6, 1e-6), "bfloat16": (1.6e-2, 1e-5), "float16": (1e-3, 1e-5)}
KL_TOLERANCE = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 1e-5), "float16": (2e-3, 1e-6)}


def load_benchmark(name: str):
    """A sibling benchmark script as a module (this folder is off the import path on purpose)."""
    spec = importlib.util.spec_from_file_location(f"ran_benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    got, want = got.float(), want.float()
    error = float((got - want).abs().max()) if got.numel() else 0.0
    return bool(torch.allclose(got, want, rtol=rtol, atol=atol)), error


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_pgd(device: str, shapes=PGD_SHAPES) -> list[dict]:
    """Each PGD Triton kernel against its reference on `device`: one record per case, with `passed`."""
    from ran_peft.kernels.pgd import (
        pgd_random_start_reference,
        pgd_random_start_triton,
        pgd_step_reference,
        pgd_step_triton,
    )

    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
    lower, upper = (0 - mean) / std, (1 - mean) / std
    results = []
    for shape in shapes:
        for dtype_name, dtype in DTYPES.items():
            generator = torch.Generator().manual_seed(0)
            pixels = torch.rand(shape, generator=generator)
            pixels.view(-1)[::11], pixels.view(-1)[5::11] = 0.0, 1.0  # some exactly on the box edges
            clean = ((pixels.to(device) - mean.view(3, 1, 1)) / std.view(3, 1, 1)).to(dtype)
            grad = torch.randn(shape, generator=generator)
            grad.view(-1)[::7] = 0.0  # sign(0) must be 0
            grad = grad.to(device, dtype)
            for norm in ("linf", "l2"):
                # per-channel bounds broadcast over (..., C, H, W), as the pixel layout places them
                box = dict(
                    std=std.view(3, 1, 1), lower=lower.view(3, 1, 1), upper=upper.view(3, 1, 1), epsilon=EPS
                )
                delta = pgd_random_start_reference(clean, norm=norm, **box)
                want = pgd_step_reference(delta, grad, clean, step_size=STEP, norm=norm, **box)
                got = pgd_step_triton(delta, grad, clean, step_size=STEP, norm=norm, **box)
                _synchronize(device)
                rtol, atol = PGD_TOLERANCE[dtype_name]
                checks = [_close(g, w, rtol, atol) for g, w in zip(got, want, strict=True)]
                start = pgd_random_start_triton(clean, norm=norm, **box).float()
                pix = start * std.view(3, 1, 1)
                radius = pix.abs().flatten(1).amax(1) if norm == "linf" else pix.flatten(1).norm(dim=1)
                slack = 1.01 if dtype != torch.float32 else 1 + 1e-5
                adversarial = clean.float() + start
                in_box = bool(
                    (
                        (adversarial >= lower.view(3, 1, 1) - 1e-5)
                        & (adversarial <= upper.view(3, 1, 1) + 1e-5)
                    ).all()
                )
                results.append(
                    {
                        "kernel": "pgd_step_triton",
                        "shape": list(shape),
                        "dtype": dtype_name,
                        "norm": norm,
                        "max_abs_error": max(error for _, error in checks),
                        "passed": all(ok for ok, _ in checks),
                    }
                )
                results.append(
                    {
                        "kernel": "pgd_random_start_triton",
                        "shape": list(shape),
                        "dtype": dtype_name,
                        "norm": norm,
                        "largest_radius_over_epsilon": float(radius.max()) / EPS,
                        "passed": bool(radius.max() <= EPS * slack)
                        and in_box
                        and bool(start.abs().sum() > 0),
                    }
                )
    return results


def check_kl(device: str, cases=KL_CASES) -> list[dict]:
    """The Triton and row-blocked KL against the naive reference (loss and both gradients) on `device`."""
    from ran_peft.kernels.rectify import (
        rectification_kl_chunked,
        rectification_kl_reference,
        rectification_kl_triton,
    )

    results = []
    for shape, mask_kind in cases:
        for dtype_name, dtype in DTYPES.items():
            generator = torch.Generator().manual_seed(0)
            clean = torch.randn(shape, generator=generator) * 3
            adversarial = clean + torch.randn(shape, generator=generator)
            mask = None
            if mask_kind == "all_masked":
                mask = torch.zeros(shape[:-1], dtype=torch.bool, device=device)
            elif mask_kind == "partial":
                mask = torch.rand(shape[:-1], generator=generator) > 0.4
                mask.view(-1)[0], mask.view(-1)[-1] = True, False
                mask = mask.to(device)
            clean, adversarial = clean.to(device, dtype), adversarial.to(device, dtype)
            for detach_clean in (False, True):
                outcome = {}
                for name, kl in (
                    ("reference", rectification_kl_reference),
                    ("triton", rectification_kl_triton),
                    ("chunked", rectification_kl_chunked),
                ):
                    c, a = clean.clone().requires_grad_(), adversarial.clone().requires_grad_()
                    loss = kl(c, a, mask, detach_clean=detach_clean)
                    loss.backward()
                    outcome[name] = (loss.detach(), c.grad, a.grad)
                _synchronize(device)
                rtol, atol = KL_TOLERANCE[dtype_name]
                for name in ("triton", "chunked"):
                    loss, grad_clean, grad_adversarial = outcome[name]
                    want_loss, want_clean, want_adversarial = outcome["reference"]
                    checks = [
                        _close(loss, want_loss, 1e-5, 1e-6),
                        _close(grad_adversarial, want_adversarial, rtol, atol),
                    ]
                    if not detach_clean:
                        checks.append(_close(grad_clean, want_clean, rtol, atol))
                    results.append(
                        {
                            "kernel": f"rectification_kl_{name}",
                            "shape": list(shape),
                            "dtype": dtype_name,
                            "mask": mask_kind,
                            "detach_clean": detach_clean,
                            "max_abs_error": max(error for _, error in checks),
                            "passed": all(ok for ok, _ in checks) and (grad_clean is None) == detach_clean,
                        }
                    )
    return results


def kernel_benchmark(quick: bool) -> dict:
    """`benchmarks/kernel_speed.py --device cuda` with the Triton kernels forced, in its own process."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "kernels.json"
        command = [sys.executable, str(HERE / "kernel_speed.py"), "--device", "cuda", "--out", str(out)]
        command += ["--quick"] if quick else []
        env = {**os.environ, "RAN_PEFT_KERNELS": "triton"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"benchmarks/kernel_speed.py failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    properties = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": properties.total_memory / 2**30,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "platform": platform.platform(),
        "RAN_PEFT_KERNELS": os.environ.get("RAN_PEFT_KERNELS", "auto"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="small model and shapes, few steps (minutes)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: " + ",".join(PARTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        return 0
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        parser.error(
            f"--skip={args.skip!r} names unknown parts {sorted(unknown)}; allowed: {', '.join(PARTS)}"
        )

    results: dict = {"environment": environment(), "quick": args.quick, "errors": {}, "seconds": {}}
    for name, part in PARTS.items():
        if name in skip:
            continue
        started = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            results[name] = part(args.quick)
        except Exception:  # one broken part must not lose the others' figures
            results["errors"][name] = traceback.format_exc()[-4000:]
            print(results["errors"][name], file=sys.stderr, flush=True)
        results["seconds"][name] = time.perf_counter() - started

    correctness = results.get("kernels_correctness", [])
    failed = [case for case in correctness if not case["passed"]]
    results["kernels_all_match_references"] = bool(correctness) and not failed
    vlm = results.get("vlm_cost", {})
    for key in ("vlm_ran_over_lora_peak_memory_ratio", "vlm_ran_over_lora_step_ratio"):
        if key in vlm:
            results[key] = vlm[key]
    four_bit = results.get("four_bit_memory", {})
    if "qlora4bit_over_fp32_memory_ratio" in four_bit:
        results["qlora4bit_over_fp32_memory_ratio"] = four_bit["qlora4bit_over_fp32_memory_ratio"]
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=True, default=str)
    summary = {k: v for k, v in results.items() if k.endswith(("ratio", "references"))}
    print(
        json.dumps(
            {**summary, "failed_kernel_cases": len(failed), "errors": sorted(results["errors"])}, indent=2
        )
    )
    return 1 if failed else 0


def _correctness(quick: bool) -> list[dict]:
    from ran_peft.kernels.dispatch import triton_available

    if not triton_available():
        raise RuntimeError(
            "triton is not installed: `pip install triton` (it comes with CUDA builds of torch)."
        )
    return check_pgd("cuda") + check_kl("cuda")


def _vlm_cost(quick: bool) -> dict:
    vlm_cost = load_benchmark("vlm_cost")
    shape = vlm_cost.QUICK if quick else vlm_cost.VLMShape()
    return vlm_cost.measure(
        shape, steps=3 if quick else 10, warmup=2, rounds=1 if quick else 2, device="cuda"
    )


def _four_bit(quick: bool) -> dict:
    vlm_cost = load_benchmark("vlm_cost")
    shape = vlm_cost.QUICK if quick else vlm_cost.VLMShape()
    return vlm_cost.measure_four_bit(shape, steps=2 if quick else 5, warmup=1, device="cuda")


PARTS = {
    "kernels_correctness": _correctness,
    "kernels_benchmark": kernel_benchmark,
    "vlm_cost": _vlm_cost,
    "four_bit_memory": _four_bit,
}


if __name__ == "__main__":
    sys.exit(main())
