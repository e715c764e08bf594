"""RAN under TRL's `SFTTrainer`: `SFTTrainer(..., peft_config=RANConfig(...), callbacks=[RANCallback()])` trains
RAN. TRL asks the model for per-token log-probabilities (`fused_lm_head=True`) and makes the loss from them; this
module answers that request with the RAN loss, so SFTTrainer's loss is the stock Trainer's, batch for batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.nn.functional as F
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The versions whose fused-LM-head contract (`FusedCausalLMOutput`: loss = -sum(log_probs) / num_items_in_batch,
# with `entropy`, `is_top1` and `label_mask` for its metrics) this module is written and tested against.
SUPPORTED_TRL = ">=1.16,<2"
FUSED_LM_HEAD = "fused_lm_head"


class UnsupportedTRLVersionError(RuntimeError):
    """The installed TRL is outside the versions RAN's SFTTrainer support was made for."""


def check_trl_version(installed: str | None = None) -> str:
    """The installed TRL version, or an error saying which versions RAN supports and what to do."""
    if installed is None:
        try:
            installed = version("trl")
        except PackageNotFoundError as error:
            raise UnsupportedTRLVersionError(
                "RAN got a TRL fused-LM-head call but TRL is not installed: `pip install 'ran-peft[trl]'`."
            ) from error
    if Version(installed) not in SpecifierSet(SUPPORTED_TRL):
        raise UnsupportedTRLVersionError(
            f"trl=={installed} is not supported by RAN's SFTTrainer support (supported: trl{SUPPORTED_TRL}): "
            f"`pip install 'trl{SUPPORTED_TRL}'` (or `pip install 'ran-peft[trl]'`), or train with the stock "
            "`transformers.Trainer` and TRL's collator (`data_collator=DataCollatorForVisionLanguageModeling(processor)`, "
            "`TrainingArguments(remove_unused_columns=False)`)."
        )
    return installed


def fused_lm_head_output(
    loss: torch.Tensor,
    logits: torch.Tensor | Any,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> Any:
    """TRL's `FusedCausalLMOutput` whose loss contract gives `loss`.

    TRL's SFTTrainer computes `-log_probs.sum() / num_items_in_batch` (or over `label_mask.sum()` without it).
    `loss` is RAN's loss normalised by `num_items_in_batch` when given, else a mean over this batch's label tokens;
    every label token gets an equal share of it, so TRL's division gives back exactly the loss the stock Trainer
    trains on. `entropy` and `is_top1` (TRL's logged metrics) come from the clean logits: `logits` is either the
    full `[B, T, V]` tensor or a `RANOutput`, whose `counted_logits` hold just the label positions' rows (RAN does
    not keep a generative VLM's whole logits past the clean pass).
    """
    from trl.trainer.utils import FusedCausalLMOutput

    labels = labels.to(loss.device)
    mask = labels[:, 1:].ne(-100)
    count = mask.sum()
    denominator = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    share = (loss * torch.as_tensor(denominator, dtype=loss.dtype, device=loss.device)) / count.clamp(min=1)
    log_probs = -share * mask.to(loss.dtype)
    with torch.no_grad():
        full = logits if torch.is_tensor(logits) else getattr(logits, "logits", None)
        if getattr(logits, "counted_logits", None) is not None:
            scored = logits.counted_logits.float()
        elif torch.is_tensor(full):
            scored = full[:, :-1][mask.to(full.device)].float()  # never the whole [B, T, V] softmax
        else:
            raise ValueError(
                "RAN's output for TRL's fused LM head has no logits of the label positions: the model's family "
                "gave no logits mask (a generative VLM's labels are needed)."
            )
        if scored.shape[0] != int(count):
            raise ValueError(f"{scored.shape[0]} scored logit rows for {int(count)} label positions.")
        entropy = torch.zeros(mask.shape, dtype=torch.float32, device=loss.device)
        is_top1 = torch.zeros(mask.shape, dtype=torch.bool, device=loss.device)
        if scored.numel():
            log_p = F.log_softmax(scored, dim=-1)
            entropy[mask] = (-(log_p.exp() * log_p).sum(-1)).to(entropy.device)
            is_top1[mask] = scored.argmax(-1).to(labels.device).eq(labels[:, 1:][mask])
    return FusedCausalLMOutput(
        loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask
    )


def split_fused_request(kwargs: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(whether TRL asked for the fused LM head, the batch without that flag); refuses what RAN cannot serve."""
    batch = dict(kwargs)
    fused = bool(batch.pop(FUSED_LM_HEAD, False))
    if fused:
        check_trl_version()
        if batch.get("shift_labels") is not None:
            raise ValueError(
                "RAN got pre-shifted `shift_labels` (TRL's context or sequence parallelism); RAN's generative loss "
                "needs `labels` aligned with `input_ids`: train without context/sequence parallelism."
            )
        if batch.get("labels") is None:
            raise ValueError(
                f"RAN got a `{FUSED_LM_HEAD}=True` call without `labels`; keys: {sorted(batch)}."
            )
    return fused, batch
