"""Benchmark of the fused kernels against the plain PyTorch formulations they replace.

Peak working memory and time of the rectification KL (forward + backward), time of the PGD update.
Usage: python benchmarks/kernel_speed.py --out kernels.json [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from ran_peft.kernels.dispatch import kernel_backend
from ran_peft.kernels.pgd import pgd_step
from ran_peft.kernels.rectify import rectification_kl, rectification_kl_reference

KL_SHAPES = [(2048, 32000), (512, 128000)]
KL_SHAPES_QUICK = [(256, 8000), (64, 32000)]
PGD_SHAPE = (32, 3, 224, 224)
PGD_SHAPE_QUICK = (4, 3, 64, 64)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])

CPU_METHOD = (
    "Each (implementation, shape) runs in a fresh subprocess. After the input logits (requires_grad) "
    "and two gradient-sized buffers are allocated and touched, the buffers are freed and the peak "
    "resident set size (VmHWM from /proc/self/status, i.e. the getrusage ru_maxrss high-water mark) "
    "is read as the baseline; one forward + backward follows and the extra is peak - baseline. So "
    "the figure is the working memory beyond the inputs and the gradients returned for them."
)
CUDA_METHOD = (
    "Each (implementation, shape) runs in a fresh subprocess. Baseline = torch.cuda.memory_allocated() "
    "after the input logits and two gradient-sized buffers exist (then freed); after "
    "torch.cuda.reset_peak_memory_stats(), one forward + backward; extra = max_memory_allocated() - baseline."
)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _kl_case(impl: str, rows: int, vocab: int, device: str, repeats: int) -> dict:
    """Runs inside a fresh subprocess: peak extra memory, then the median time of forward + backward."""
    kl = rectification_kl if impl == "ours" else rectification_kl_reference
    gen = torch.Generator().manual_seed(0)
    clean = (torch.randn(rows, vocab, generator=gen) * 2).to(device).requires_grad_()
    adv = (clean.detach() + torch.randn(rows, vocab, generator=gen).to(device)).requires_grad_()
    mask = torch.rand(rows, generator=gen).to(device) > 0.1

    # Warm-up on two rows: loads code paths and thread pools, which are no working memory of the KL.
    kl(clean[:2].detach().clone().requires_grad_(), adv[:2].detach().clone().requires_grad_()).backward()

    stand_ins = [torch.ones_like(clean), torch.ones_like(adv)]  # where the returned gradients will live
    _sync(device)
    if device == "cuda":
        del stand_ins
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _peak_rss_bytes()
        del stand_ins
    kl(clean, adv, mask).backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    extra = peak - baseline

    times = []
    for _ in range(repeats):
        clean.grad = adv.grad = None
        _sync(device)
        start = time.perf_counter()
        kl(clean, adv, mask).backward()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"peak_extra_bytes": extra, "median_seconds": statistics.median(times)}


def _run_kl_case_in_subprocess(impl: str, rows: int, vocab: int, device: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--kl-case", f"{impl},{rows},{vocab},{repeats}", "--device", device]
    command += ["--threads", str(torch.get_num_threads())]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _plain_pgd_update(delta, grad, clean, std_c, lower_c, upper_c, epsilon, step_size):
    """The update as the plain sequence of PyTorch ops: sign, mul, add, clamp, add, clamp, sub."""
    step = torch.sign(grad)
    step = step * (step_size / std_c)
    new = delta + step
    new = torch.clamp(new, -epsilon / std_c, epsilon / std_c)
    adv = clean + new
    adv = torch.clamp(adv, lower_c, upper_c)
    return adv - clean, adv


def _pgd_timing(shape, device: str, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    clean = ((torch.rand(shape, generator=gen) - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1)).to(device)
    grad = torch.randn(shape, generator=gen).to(device)
    delta = torch.zeros_like(clean)
    std, lower, upper = STD.to(device), ((0 - MEAN) / STD).to(device), ((1 - MEAN) / STD).to(device)
    # per-channel bounds placed for (..., C, H, W) images (the kernel takes any per-element broadcast)
    std_c, lower_c, upper_c = std.view(3, 1, 1), lower.view(3, 1, 1), upper.view(3, 1, 1)
    epsilon, step_size = 8 / 255, 2 / 255

    def ours():
        return pgd_step(
            delta, grad, clean, std=std_c, lower=lower_c, upper=upper_c, epsilon=epsilon, step_size=step_size
        )

    def plain():
        return _plain_pgd_update(delta, grad, clean, std_c, lower_c, upper_c, epsilon, step_size)

    for got, want in zip(ours(), plain(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    timings = {"ours": [], "plain": []}
    for _ in range(3):  # warm-up (and Triton compilation on CUDA)
        ours(), plain()
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        for name, fn in (("ours", ours), ("plain", plain)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            timings[name].append(time.perf_counter() - start)
    ours_s, plain_s = statistics.median(timings["ours"]), statistics.median(timings["plain"])
    return {
        "shape": list(shape),
        "ours_median_seconds": ours_s,
        "plain_median_seconds": plain_s,
        "ratio": ours_s / plain_s,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (median reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, OpenMP threads spin-waiting for a busy "
        "core make multi-threaded timings erratic)",
    )
    parser.add_argument("--kl-case", help=argparse.SUPPRESS)  # internal: one KL case in this process
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.kl_case:
        impl, rows, vocab, repeats = args.kl_case.split(",")
        print(json.dumps(_kl_case(impl, int(rows), int(vocab), args.device, int(repeats))))
        return
    if not args.out:
        parser.error("--out is required")

    kl_shapes = KL_SHAPES_QUICK if args.quick else KL_SHAPES
    pgd_shape = PGD_SHAPE_QUICK if args.quick else PGD_SHAPE
    kl_repeats = args.repeats or (3 if args.quick else 3)
    pgd_repeats = args.repeats or (20 if args.quick else 30)

    kl_results = []
    for rows, vocab in kl_shapes:
        naive = _run_kl_case_in_subprocess("naive", rows, vocab, args.device, kl_repeats)
        ours = _run_kl_case_in_subprocess("ours", rows, vocab, args.device, kl_repeats)
        entry = {
            "shape": [rows, vocab],
            "logits_bytes_each": rows * vocab * 4,
            "naive_peak_extra_bytes": naive["peak_extra_bytes"],
            "ours_peak_extra_bytes": ours["peak_extra_bytes"],
            "memory_ratio": ours["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1),
            "naive_median_seconds": naive["median_seconds"],
            "ours_median_seconds": ours["median_seconds"],
            "time_ratio": ours["median_seconds"] / naive["median_seconds"],
        }
        kl_results.append(entry)
        print(json.dumps(entry), file=sys.stderr)

    pgd = _pgd_timing(pgd_shape, args.device, pgd_repeats)
    print(json.dumps(pgd), file=sys.stderr)
    probe = torch.zeros(1, device=args.device)
    results = {
        "kl_peak_memory_ratio": max(e["memory_ratio"] for e in kl_results),
        "kl_time_ratio": max(e["time_ratio"] for e in kl_results),
        "pgd_update_time_ratio": pgd["ratio"],
        "kl": kl_results,
        "kl_case": {
            "dtype": "float32",
            "mask": "about 90% of rows counted",
            "implementations": {
                "ours": f"ran_peft.kernels.rectification_kl (dispatcher: {kernel_backend(probe)} backend)",
                "naive": "rectification_kl_reference: log_softmax both, F.kl_div(log_target=True), autograd",
            },
        },
        "pgd": pgd,
        "pgd_case": {
            "dtype": "float32",
            "norm": "linf",
            "ours": "ran_peft.kernels.pgd_step (dispatcher)",
            "plain": "sign, mul, add, clamp, add, clamp, sub",
        },
        "method": {
            "kl_memory": CUDA_METHOD if args.device == "cuda" else CPU_METHOD,
            "timing": "median wall time of repeated runs after warm-up; KL: forward + backward",
            "ratios": "ours / naive (ours / plain for PGD); the KL ratios are the worst case over shapes",
        },
        "quick": args.quick,
        "device": args.device,
        "backend": kernel_backend(probe),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "python_version": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "env": {"RAN_PEFT_KERNELS": os.environ.get("RAN_PEFT_KERNELS", "auto")},
    }
    with open(args.out, "w") as out:
        json.dump(results, out, indent=2)
    print(
        json.dumps(
            {k: results[k] for k in ("kl_peak_memory_ratio", "kl_time_ratio", "pgd_update_time_ratio")}
        )
    )


if __name__ == "__main__":
    main()
