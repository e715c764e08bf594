"""bitsandbytes as RAN users meet it: no notice about its CPU kernels unless 4-bit layers are in use, and then one
plain sentence saying which CPU path they take.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

# On a CPU with AVX512-BF16, importing bitsandbytes (which peft and transformers' Trainer do whenever it is
# installed) tries to fetch a faster 4-bit kernel from the Hugging Face Hub through the `kernels` package and logs
# a warning when it cannot, even in runs that never quantise anything. Offline, `kernels` first logs that it skips
# the publisher check of that repository. Both notices are about that one kernel: (logger, message prefix).
_BITSANDBYTES_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
_IMPORT_NOTICES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{_BITSANDBYTES_HUB_KERNEL}'"),
)


class _HubKernelNoticeFilter(logging.Filter):
    """Drops the import-time notices about bitsandbytes' Hub kernel; remembers that one was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(record.name == name and message.startswith(prefix) for name, prefix in _IMPORT_NOTICES):
            self.seen = True
            return False
        return True


_notice_filter = _HubKernelNoticeFilter()
_explained = False


def quiet_bitsandbytes_import_notice() -> None:
    """Install the filter (idempotent). Must run before bitsandbytes is first imported to take effect."""
    for logger_name, _ in _IMPORT_NOTICES:
        notice_logger = logging.getLogger(logger_name)
        if _notice_filter not in notice_logger.filters:
            notice_logger.addFilter(_notice_filter)


def four_bit_cpu_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes 4-bit linear layers of `model` whose weights live on the CPU."""
    layers = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit" and weight.device.type == "cpu":
            layers.append(module)
    return layers


def cpu_path_description() -> str:
    """Which of bitsandbytes' CPU paths 4-bit layers take on this machine, in plain words."""
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        return (
            "this CPU has AVX512-BF16, so bitsandbytes runs its built-in AVX512 4-bit kernels (its faster "
            "`kernels-community` kernel would need Hugging Face's `kernels` package and network access to the Hub, "
            "so it is not used)"
        )
    return "this CPU has no AVX512-BF16, so bitsandbytes dequantises each 4-bit weight in every forward pass"


def explain_four_bit_cpu_path(model: nn.Module) -> str | None:
    """Log once per process which CPU path the model's 4-bit layers take; returns the sentence (None: no such layers)."""
    global _explained
    if not four_bit_cpu_layers(model):
        return None
    sentence = f"4-bit layers on the CPU: {cpu_path_description()}."
    if not _explained:
        logger.warning(sentence)
        _explained = True
    return sentence
