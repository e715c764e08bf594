"""Backend choice for the fused kernels: Triton on CUDA, plain PyTorch elsewhere.

Set ``RAN_PEFT_KERNELS`` to ``auto`` (default), ``triton`` or ``torch`` to force a backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

# This folder installs as `ran_peft.kernels` and has no `__init__.py`, so from the repository root it never passes for
# Hugging Face's `kernels` package (which transformers and bitsandbytes import). Should nothing else be installed
# under that name, `kernels` would be an empty namespace package: refuse to run its modules under the wrong name.
if not __name__.startswith("ran_peft.kernels."):
    raise ImportError(
        f"{__file__} is part of ran_peft and imports as ran_peft.kernels.dispatch, not as {__name__}; "
        "install ran_peft (pip install -e .) and import it from there"
    )

ENV_VAR = "RAN_PEFT_KERNELS"
ALLOWED_BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """The backend asked for through ``RAN_PEFT_KERNELS``; raises ValueError on an unknown value."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in ALLOWED_BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a known kernel backend; "
            f"allowed values are {', '.join(ALLOWED_BACKENDS)}"
        )
    return value


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported. Checked without importing it, so that importing this package
    never decides triton's interpreter mode (triton reads ``TRITON_INTERPRET`` when first imported)."""
    return importlib.util.find_spec("triton") is not None


def kernel_backend(tensor: torch.Tensor | None = None) -> str:
    """Return ``"triton"`` or ``"torch"``: the backend the dispatching functions use for ``tensor``.

    ``auto`` picks Triton when the tensor (or, without one, the machine) is on CUDA and triton is
    installed. ``triton`` forces the kernels, e.g. on CPU tensors with ``TRITON_INTERPRET=1``.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
        return "triton"
    on_cuda = tensor.is_cuda if tensor is not None else torch.cuda.is_available()
    return "triton" if on_cuda and triton_available() else "torch"


def load_triton():
    """Import triton and ``triton.language`` on first use of a Triton kernel."""
    import triton
    import triton.language as tl

    return triton, tl


@functools.cache
def _jit_cached(fn, interpret: bool):
    triton, _ = load_triton()
    return triton.jit(fn)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jit(fn):
    """``triton.jit(fn)``, done on first launch rather than at import time.

    Kernels are written as plain functions and compiled lazily, so importing ``ran_peft.kernels``
    never needs triton and ``TRITON_INTERPRET`` set after import is still honoured.
    """
    return _jit_cached(fn, _interpret_requested())


def triton_interpreter_ready() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process.

    That needs ``TRITON_INTERPRET=1`` both now and when triton was first imported: triton builds its
    library functions (``tl.sum``, ``tl.rand``, ...) for the interpreter only at import time.
    """
    if not triton_available() or not _interpret_requested():
        return False
    _, tl = load_triton()
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction) and isinstance(tl.rand, InterpretedFunction)
