"""What the kernel tests share: Triton interpreted on CPU, and a fresh process for the Triton tests when another
test module imported triton before `TRITON_INTERPRET=1` was set (triton reads it once, at import)."""

import os

# Must precede the first import of triton: triton builds tl.sum/tl.rand for the interpreter at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys

import pytest

from ran_peft.kernels.dispatch import triton_available, triton_interpreter_ready

CHILD = "RAN_PEFT_KERNEL_TEST_CHILD"
INTERPRETED = triton_interpreter_ready()
if os.environ.get(CHILD) and not INTERPRETED:
    raise RuntimeError("fresh test process, yet triton is not running interpreted")

needs_triton = pytest.mark.skipif(
    not INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1 in this process; "
    "the module's *_in_fresh_process test runs these",
)
only_when_triton_runs_elsewhere = pytest.mark.skipif(
    INTERPRETED or not triton_available() or bool(os.environ.get(CHILD)),
    reason="the Triton tests already run in this process",
)


def run_triton_tests_in_fresh_process(test_file: str) -> None:
    """Run `test_file`'s Triton tests in a fresh interpreter where triton is imported in interpreter mode."""
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD: "1"}
    env.pop("RAN_PEFT_KERNELS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", test_file]
    command += ["-k", "triton and not fresh_process"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-3000:]
