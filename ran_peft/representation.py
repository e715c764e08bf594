"""Representation metrics of a fine-tuned model, apart from robustness: zero-shot classification and retrieval
for dual encoders, image features and the linear-probe accuracy built on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ran_peft.evaluation import Batch, _evaluation_mode, _model_device, _to_device, clean_accuracy
from ran_peft.families import (
    DualEncoderFamily,
    detect_family,
    unwrap_model,
)

# ----------------------------------------------------------------------------------------------------------------
# Dual encoders: zero-shot classification and retrieval
# ----------------------------------------------------------------------------------------------------------------


def _require_dual_encoder(model: nn.Module, what: str) -> None:
    family = detect_family(model)
    if not isinstance(family, DualEncoderFamily):
        raise ValueError(f"{what} needs a dual encoder (CLIP / SigLIP style); this model is a {family.name}.")


def _embedding_tensor(output: Any, method: str) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose `pooler_output` is the projected embedding
    if torch.is_tensor(output):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if torch.is_tensor(value):
            return value
    raise ValueError(f"`{method}` returned a {type(output).__name__} without an embedding tensor.")


def _has_feature_methods(base: nn.Module) -> bool:
    return callable(getattr(base, "get_image_features", None)) and callable(
        getattr(base, "get_text_features", None)
    )


def _image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    base = unwrap_model(model)
    embeddings = _embedding_tensor(base.get_image_features(pixel_values=pixel_values), "get_image_features")
    return F.normalize(embeddings.float(), dim=-1)


def _text_embeddings(model: nn.Module, text_inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    base = unwrap_model(model)
    embeddings = _embedding_tensor(base.get_text_features(**text_inputs), "get_text_features")
    return F.normalize(embeddings.float(), dim=-1)


def zero_shot_accuracy(
    model: nn.Module, batches: Iterable[Batch], class_text_inputs: Mapping[str, torch.Tensor]
) -> float:
    """Prompt-based zero-shot accuracy of a dual encoder: each image gets the class whose prompt embedding is
    the most similar (the argmax of `logits_per_image`, whose scale and bias do not change the order).

    The class prompts are embedded once; a model without `get_image_features` / `get_text_features` is scored
    through its forward pass instead.
    """
    _require_dual_encoder(model, "zero_shot_accuracy")
    if class_text_inputs is None or "input_ids" not in class_text_inputs:
        raise ValueError(
            "zero_shot_accuracy needs `class_text_inputs` with `input_ids` (one prompt per class)."
        )
    if not _has_feature_methods(unwrap_model(model)):
        return clean_accuracy(model, batches, class_text_inputs=class_text_inputs)
    device = _model_device(model)
    right = total = 0
    with _evaluation_mode(model), torch.no_grad():
        classes = _text_embeddings(model, {key: value.to(device) for key, value in class_text_inputs.items()})
        for batch in batches:
            inputs = _to_device(batch, device)
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError("zero_shot_accuracy needs `labels` (class indices) in every batch.")
            predicted = (_image_embeddings(model, inputs["pixel_values"]) @ classes.T).argmax(-1)
            scored = labels.ne(-100)
            right += int((predicted.eq(labels) & scored).sum())
            total += int(scored.sum())
    if total == 0:
        raise ValueError("no sample could be scored: the batches were empty or every label was -100.")
    return right / total


@torch.no_grad()
def image_features(model: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """L2-normalised image embeddings of a dual encoder (the adapter, if any, active) for every batch, in eval mode."""
    _require_dual_encoder(model, "image_features")
    device = _model_device(model)
    with _evaluation_mode(model):
        chunks = [_image_embeddings(model, batch["pixel_values"].to(device)) for batch in batches]
    if not chunks:
        raise ValueError("image_features got no batches.")
    return torch.cat(chunks).cpu()


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-3,
    iterations: int = 200,
) -> float:
    """Accuracy of a multinomial logistic regression fit on frozen features (L-BFGS from zeros: deterministic).

    How much of a task the features already hold: the "transfer" measure of the noise study, and the difficulty
    of a task for a given backbone.
    """
    if len(train_features) != len(train_labels) or len(eval_features) != len(eval_labels):
        raise ValueError(
            f"features and labels must pair up: train {len(train_features)} vs {len(train_labels)}, "
            f"eval {len(eval_features)} vs {len(eval_labels)}."
        )
    mean = train_features.mean(0, keepdim=True)
    scale = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train, x_eval = (train_features - mean) / scale, (eval_features - mean) / scale
    classes = int(max(train_labels.max(), eval_labels.max())) + 1
    linear = nn.Linear(x_train.shape[1], classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), train_labels) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(linear(x_eval).argmax(-1).eq(eval_labels).float().mean())


def retrieval_recall_at_k(
    model: nn.Module, batches: Iterable[Batch], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k of a dual encoder over the whole evaluation set.

    Every batch holds image-caption pairs (`pixel_values` and `input_ids`, row i captions image i); the
    embeddings of all batches are gathered, then each image ranks all captions and each caption all images.
    A pair is found at k when fewer than k others score at least as high (ties count against the model).
    Keys: `image_to_text_recall@k` and `text_to_image_recall@k`.
    """
    _require_dual_encoder(model, "retrieval_recall_at_k")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}.")
    device = _model_device(model)
    base = unwrap_model(model)
    images, texts = [], []
    with _evaluation_mode(model), torch.no_grad():
        for batch in batches:
            inputs = _to_device(batch, device)
            if "input_ids" not in inputs or "pixel_values" not in inputs:
                raise ValueError(
                    f"retrieval needs `pixel_values` and `input_ids` in every batch, got {sorted(inputs)}."
                )
            text_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
            if _has_feature_methods(base):
                images.append(_image_embeddings(model, inputs["pixel_values"]))
                texts.append(_text_embeddings(model, text_inputs))
            else:
                outputs = model(pixel_values=inputs["pixel_values"], **text_inputs)
                images.append(F.normalize(_embedding_tensor(outputs.image_embeds, "forward").float(), dim=-1))
                texts.append(F.normalize(_embedding_tensor(outputs.text_embeds, "forward").float(), dim=-1))
    if not images:
        raise ValueError("retrieval_recall_at_k got no batches.")
    image_embeddings, text_embeddings = torch.cat(images), torch.cat(texts)
    if image_embeddings.shape[0] != text_embeddings.shape[0]:
        raise ValueError(
            f"{image_embeddings.shape[0]} images but {text_embeddings.shape[0]} captions: retrieval needs one caption "
            "per image."
        )
    similarity = image_embeddings @ text_embeddings.T
    matching = similarity.diagonal()
    others = ~torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    image_rank = ((similarity >= matching[:, None]) & others).sum(
        dim=1
    )  # captions at least as close as its own
    text_rank = ((similarity >= matching[None, :]) & others).sum(dim=0)  # images at least as close as its own
    recalls = {}
    for k in ks:
        recalls[f"image_to_text_recall@{k}"] = image_rank.lt(k).float().mean().item()
        recalls[f"text_to_image_recall@{k}"] = text_rank.lt(k).float().mean().item()
    return recalls
