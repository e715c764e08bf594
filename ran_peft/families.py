"""What RAN needs to know about a model: how to run it on (perturbed) pixels, its task loss, its predictive
distribution and its image features. Families are recognised from the forward signature, not from a name list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ran_peft.pixel_layout import BatchPixelBox, PixelLayout, unattacked_pixel_keys
from ran_peft.pixels import PixelBox

Forward = Callable[..., Any]

# How far (in [0, 1] pixel units) pixels may leave the valid box before RAN calls the normalisation wrong: resizing
# with bicubic or Lanczos filters overshoots [0, 1] a little near sharp edges, a mismatched mean/std by much more.
PIXEL_RANGE_TOLERANCE = 0.1


# What every "cannot be trained" error ends with: the families RAN recognises, and how.
SUPPORTED_FAMILIES = (
    "RAN supports: image classifiers (transformers `...ForImageClassification`); transformers dual encoders "
    "(`CLIPModel`, `SiglipModel`); generative VLMs whose forward takes `pixel_values` and `labels` (LLaVA, "
    "Gemma 3, PaliGemma, BLIP, ...); and open_clip models such as BiomedCLIP (`open_clip.create_model(...)`, "
    "recognised by `encode_image`, `encode_text`, `logit_scale` and `model.visual.preprocess_cfg`)."
)


class UnsupportedModelError(TypeError):
    """The model cannot be trained with RAN; the message says what is missing."""


@dataclass
class FamilyOutput:
    """One forward pass, reduced to what the recipe uses."""

    loss: torch.Tensor
    logits: torch.Tensor | None  # predictive logits, rows over the last dim (None: the model returns none)
    logits_mask: torch.Tensor | None  # which rows count (None: all)
    features: torch.Tensor | None  # pooled image features [B, D] when asked for


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT and DDP wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _pool(hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dim() == 4:  # convolutional maps [B, C, H, W]
        return hidden.float().mean(dim=(-2, -1))
    if hidden.dim() == 3:  # token sequences [B, T, D]
        return hidden.float().mean(dim=1)
    return hidden.float().flatten(1)


def _get(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def check_pixel_range(
    pixel_values: torch.Tensor, box: BatchPixelBox, tolerance: float = PIXEL_RANGE_TOLERANCE
) -> None:
    """Refuse pixels that lie outside the box by more than `tolerance` pixel units: the mean/std do not fit them.

    `box` is the batch's placed box, so channels are read where the layout puts them and padding is not checked.
    This catches the common mistakes (raw 0-255 pixels; pixels normalised with another processor's wider mean/std;
    normalised pixels given a `do_normalize=False` box). A mismatch that keeps every pixel inside the box (two
    close normalisations, such as ImageNet's and CLIP's) cannot be seen from the pixels.
    """
    with torch.no_grad():
        low, high = box.channel_ranges(box.to_pixels(pixel_values.detach()))
    if bool((low >= -tolerance).all()) and bool((high <= 1 + tolerance).all()):
        return
    mean, std = torch.tensor(box.box.mean), torch.tensor(box.box.std)
    lower, upper = (0.0 - mean) / std, (1.0 - mean) / std
    seen = _ranges(*box.channel_ranges(pixel_values.detach()))
    allowed, in_pixels = _ranges(lower, upper), _ranges(low, high)
    raise ValueError(
        f"`pixel_values` do not fit the pixel normalisation RAN was given (mean={list(box.box.mean)}, "
        f"std={list(box.box.std)}): per channel they span {seen}, but that normalisation maps [0, 1] pixels to "
        f"{allowed} (these pixels would be {in_pixels} in [0, 1] pixel units, tolerance {tolerance}). The "
        "normalisation (mean/std) does not match these pixels: pass the image processor that made them "
        "(Trainer's `processing_class`), or set RANConfig.image_mean/image_std to its values; raw 0-255 pixels "
        "must be rescaled and normalised first."
    )


def _ranges(low: torch.Tensor, high: torch.Tensor) -> str:
    return ", ".join(f"[{a:.3g}, {b:.3g}]" for a, b in zip(low.tolist(), high.tolist(), strict=True))


class ModelFamily:
    """A kind of model: subclasses say how one forward pass gives loss, logits and features."""

    name = "base"
    # Whether evaluation and inference calls must also go through `run` (the model's forward does not take the
    # Trainer's batch names).
    routes_every_call = False

    def check_inputs(
        self,
        inputs: Mapping[str, Any],
        box: PixelBox | BatchPixelBox | None = None,
        pixel_layout: str | PixelLayout | None = "auto",
    ) -> None:
        """Refuse a batch RAN cannot train on, with what is wrong; with `box`, also pixels the box does not fit
        (a `PixelBox` is placed over the batch with `pixel_layout` first)."""
        if "pixel_values" not in inputs or not torch.is_tensor(inputs["pixel_values"]):
            others = unattacked_pixel_keys(inputs)
            hint = (
                f" It holds {', '.join(f'`{key}`' for key in others)}: RAN attacks `pixel_values` only. If those are "
                "the model's images under another name, pass them as `pixel_values` (rename the key in the "
                "collator; the model's forward must take `pixel_values`); video frames are not attacked."
                if others
                else ""
            )
            raise ValueError(
                f"RAN needs `pixel_values` (a tensor) in every batch; this batch has keys {sorted(inputs)}.{hint}"
            )
        pixel_values = inputs["pixel_values"]
        if pixel_values.numel() == 0:
            raise ValueError("RAN got an empty batch (`pixel_values` has no elements).")
        if not torch.isfinite(pixel_values).all():
            raise ValueError(
                "`pixel_values` holds NaN or inf: fix the data pipeline (RAN will not attack it)."
            )
        if box is not None:
            if isinstance(box, PixelBox):
                box = BatchPixelBox.place(box, inputs, pixel_layout)
            check_pixel_range(pixel_values, box)

    def run(
        self,
        forward: Forward,
        inputs: Mapping[str, Any],
        pixel_values: torch.Tensor,
        *,
        want_features: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> FamilyOutput:
        """One forward pass of `forward` on `inputs` with `pixel_values` in place of the batch's own: the task
        loss, the predictive logits (and which rows count) and, with `want_features`, the pooled image features.
        `extra` holds further keyword arguments for the forward (e.g. the Trainer's `num_items_in_batch`)."""
        raise NotImplementedError

    def image_features(
        self, model: nn.Module, inputs: Mapping[str, Any], pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """The image features of the vision tower and projector alone, one row per image token or image
        (`RANConfig.adversarial_pass='image_features'`): the language model or text tower does not run."""
        return vision_tower_features(model, inputs, pixel_values)

    def count_items(self, inputs: Mapping[str, Any]) -> int:
        """How many loss items this batch holds, counted as `transformers.Trainer` counts them."""
        labels = inputs.get("labels")
        return int(labels.ne(-100).sum()) if torch.is_tensor(labels) else int(inputs["pixel_values"].shape[0])


class ImageClassifierFamily(ModelFamily):
    """`...ForImageClassification`: cross-entropy on class logits; features are the pooled last hidden state."""

    name = "image_classifier"

    def check_inputs(self, inputs, box=None, pixel_layout="auto"):
        super().check_inputs(inputs, box, pixel_layout)
        if inputs.get("labels") is None:
            raise ValueError("an image classifier needs `labels` in the batch to train with RAN.")

    def run(self, forward, inputs, pixel_values, *, want_features=False, extra=None):
        kwargs = {**inputs, **(extra or {}), "pixel_values": pixel_values}
        if want_features:
            kwargs["output_hidden_states"] = True
        outputs = forward(**kwargs)
        features = None
        if want_features:
            hidden_states = _get(outputs, "hidden_states")
            features = _pool(hidden_states[-1]) if hidden_states else None
        return FamilyOutput(_get(outputs, "loss"), _get(outputs, "logits"), None, features)


class DualEncoderFamily(ModelFamily):
    """CLIP / SigLIP-style dual encoders.

    With `labels` and class prompts (`class_input_ids`, optional `class_attention_mask`, in the batch or given to
    RAN once), the task is prompt-based classification: cross-entropy over image-to-prompt logits. Otherwise it
    is the model's own contrastive (InfoNCE or sigmoid) loss over the batch's image-caption pairs.
    """

    name = "dual_encoder"

    def __init__(self, class_text_inputs: Mapping[str, torch.Tensor] | None = None):
        self.class_text_inputs = dict(class_text_inputs) if class_text_inputs is not None else None

    def _class_prompts(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        if "class_input_ids" in inputs:
            prompts = {"input_ids": inputs["class_input_ids"]}
            if inputs.get("class_attention_mask") is not None:
                prompts["attention_mask"] = inputs["class_attention_mask"]
            return prompts
        return self.class_text_inputs

    def check_inputs(self, inputs, box=None, pixel_layout="auto"):
        super().check_inputs(inputs, box, pixel_layout)
        if inputs.get("labels") is not None:
            if self._class_prompts(inputs) is None:
                raise ValueError(
                    "a dual encoder batch with `labels` needs class prompts: put `class_input_ids` in the batch or "
                    "pass `class_text_inputs` (the tokenised prompts, one per class) to RAN."
                )
        elif inputs.get("input_ids") is None:
            raise ValueError(
                "a dual encoder batch needs either `input_ids` (captions, for the contrastive loss) or `labels` with "
                "class prompts (for prompt-based classification)."
            )

    def run(self, forward, inputs, pixel_values, *, want_features=False, extra=None):
        labels = inputs.get("labels")
        if labels is not None:
            prompts = self._class_prompts(inputs)
            device = pixel_values.device
            kwargs = {key: value.to(device) for key, value in prompts.items()}
            extra = dict(extra or {})
            num_items_in_batch = extra.pop("num_items_in_batch", None)
            outputs = forward(pixel_values=pixel_values, **kwargs, **extra)
            logits = _get(outputs, "logits_per_image")
            if num_items_in_batch:  # the Trainer's gradient-accumulation contract: a sum over the whole batch
                loss = (
                    F.cross_entropy(logits.float(), labels.to(device), reduction="sum") / num_items_in_batch
                )
            else:
                loss = F.cross_entropy(logits.float(), labels.to(device))
        else:
            skip = {"labels", "class_input_ids", "class_attention_mask", "return_loss"}
            kwargs = {key: value for key, value in inputs.items() if key not in skip}
            kwargs.update(extra or {})
            outputs = forward(**{**kwargs, "pixel_values": pixel_values, "return_loss": True})
            logits = _get(outputs, "logits_per_image")
            loss = _get(outputs, "loss")
        features = _get(outputs, "image_embeds") if want_features else None
        return FamilyOutput(loss, logits, None, features.float() if features is not None else None)

    def count_items(self, inputs):
        return int(inputs["pixel_values"].shape[0])


class GenerativeFamily(ModelFamily):
    """Generative VLMs (LLaVA-style, BLIP, PaliGemma, ...): the language-model loss on the answer tokens.

    The predictive distribution is the next-token distribution at every position whose next label counts.
    """

    name = "generative"

    _feature_names = ("image_hidden_states", "image_embeds")

    def check_inputs(self, inputs, box=None, pixel_layout="auto"):
        super().check_inputs(inputs, box, pixel_layout)
        if inputs.get("labels") is None:
            raise ValueError(
                "a generative VLM needs `labels` (answer tokens, -100 elsewhere) to train with RAN."
            )

    def run(self, forward, inputs, pixel_values, *, want_features=False, extra=None):
        kwargs = {**inputs, **(extra or {}), "pixel_values": pixel_values}
        outputs = forward(**kwargs)
        logits = _get(outputs, "logits")
        labels = inputs["labels"]
        features = self._image_features(outputs, labels.shape[0]) if want_features else None
        if logits is None:
            # BlipForQuestionAnswering returns only its answer decoder's loss: the task terms still work, the
            # terms over the predictive distribution (KL) cannot; `ran_loss` says so when they are asked for.
            return FamilyOutput(_get(outputs, "loss"), None, None, features)
        labels = labels.to(logits.device)
        # Models that put the image features in front of the text themselves (GIT) return logits for those
        # positions too; their own loss reads the text positions, the last ones, and so does the KL.
        prefix = logits.shape[1] - labels.shape[1] if labels.dim() == 2 else 0
        if logits.shape[0] != labels.shape[0] or prefix < 0:
            raise ValueError(
                f"logits cover {tuple(logits.shape[:2])} positions but `labels` {tuple(labels.shape[:2])}: RAN needs "
                "one label per input position: pass `labels` shaped like `input_ids` (with the processor's expanded "
                "image tokens, -100 on them)."
            )
        mask = torch.zeros(logits.shape[:2], dtype=torch.bool, device=labels.device)
        mask[:, prefix:-1] = labels[:, 1:].ne(-100)
        return FamilyOutput(_get(outputs, "loss"), logits, mask, features)

    def _image_features(self, outputs: Any, batch: int) -> torch.Tensor | None:
        candidates = [_get(outputs, name) for name in self._feature_names]
        vision = _get(outputs, "image_outputs")  # transformers >= 5: the vision tower's own output
        if vision is not None:
            candidates += [_get(vision, "pooler_output"), _get(vision, "last_hidden_state")]
        for value in candidates:
            if torch.is_tensor(value):
                return _pool(value.reshape(batch, -1, value.shape[-1]))
        return None

    def count_items(self, inputs):
        return int(inputs["labels"][..., 1:].ne(-100).sum())


def vision_tower_features(
    model: nn.Module, inputs: Mapping[str, Any], pixel_values: torch.Tensor
) -> torch.Tensor:
    """`get_image_features` of the base model, with the batch's image inputs its signature names, as one float
    tensor `[rows, D]` (per-image lists, as LLaVA-style models return them, are stacked)."""
    base = unwrap_model(model)
    get_image_features = getattr(base, "get_image_features", None)
    if get_image_features is None:
        raise ValueError(
            f"RANConfig.adversarial_pass='image_features' runs the model's `get_image_features`, which "
            f"{type(base).__name__} does not have; use adversarial_pass='model'."
        )
    parameters = inspect.signature(get_image_features).parameters
    image_inputs = {
        key: value for key, value in inputs.items() if key in parameters and key != "pixel_values"
    }
    output = get_image_features(pixel_values=pixel_values, **image_inputs)
    if not torch.is_tensor(output) and not isinstance(output, (list, tuple)):
        output = _get(
            output, "pooler_output"
        )  # transformers >= 5.x: a ModelOutput with the projected features
    if isinstance(output, (list, tuple)):
        output = torch.cat([part.reshape(-1, part.shape[-1]) for part in output])
    return output.float()


@dataclass(frozen=True)
class FamilyDetector:
    """How `detect_family` recognises one kind of model that transformers' forward signatures do not describe.

    `detect(model, class_text_inputs)` returns the family for a model of that kind (else None);
    `why_unsupported(model)` says why a model that looks like that kind cannot be trained (else None), and that
    sentence leads the error for a model no family takes. A module registers its detector when it is imported
    (`ran_peft.open_clip` does, and `import ran_peft` imports it), so this module imports none of them.
    """

    name: str
    detect: Callable[[nn.Module, Mapping[str, torch.Tensor] | None], ModelFamily | None]
    why_unsupported: Callable[[nn.Module], str | None] = lambda model: None


# Asked in registration order, before the forward signature is read.
_FAMILY_DETECTORS: dict[str, FamilyDetector] = {}


def register_family_detector(detector: FamilyDetector) -> None:
    """Let `detect_family` recognise another kind of model; registering a name again replaces its detector."""
    _FAMILY_DETECTORS[detector.name] = detector


def detect_family(
    model: nn.Module, class_text_inputs: Mapping[str, torch.Tensor] | None = None
) -> ModelFamily:
    """Recognise the model family: the registered detectors first (open_clip), then the base model's forward
    signature and generation ability (transformers models).

    Raises `UnsupportedModelError` naming what the model lacks and the families RAN supports.
    """
    base = unwrap_model(model)
    for detector in _FAMILY_DETECTORS.values():
        family = detector.detect(base, class_text_inputs)
        if family is not None:
            return family
    parameters = inspect.signature(base.forward).parameters
    name = type(base).__name__
    if "pixel_values" not in parameters:
        images = [key for key in parameters if key != "pixel_values" and ("pixel" in key or "patches" in key)]
        taken = (
            f"its forward takes its images as {', '.join(f'`{key}`' for key in images)}, not as `pixel_values`, "
            "the input RAN attacks"
            if images
            else "its forward takes no `pixel_values`, so there is no image to attack"
        )
        reasons = (detector.why_unsupported(base) for detector in _FAMILY_DETECTORS.values())
        reason = (
            next((reason for reason in reasons if reason), None)
            or f"{name} cannot be trained with RAN: {taken}."
        )
        raise UnsupportedModelError(f"{reason} {SUPPORTED_FAMILIES}")
    if "return_loss" in parameters:
        return DualEncoderFamily(class_text_inputs)
    if "labels" in parameters:
        can_generate = getattr(base, "can_generate", None)
        if callable(can_generate) and can_generate():
            return GenerativeFamily()
        return ImageClassifierFamily()
    raise UnsupportedModelError(
        f"{name} cannot be trained with RAN: its forward returns no training loss (it takes neither `labels` nor "
        f"`return_loss`); use a model with a head. {SUPPORTED_FAMILIES}"
    )


def token_embedding(model: nn.Module) -> nn.Module:
    """The module whose output is the text token embeddings (where the text attack adds its perturbation)."""
    base = unwrap_model(model)
    try:
        module = base.get_input_embeddings()
        if module is not None:
            return module
    except (NotImplementedError, AttributeError):
        pass
    for name, module in base.named_modules():
        if isinstance(module, nn.Embedding) and name.split(".")[-1] in (
            "token_embedding",
            "embed_tokens",
            "word_embeddings",
        ):
            return module
    raise UnsupportedModelError(f"{type(base).__name__} has no token embedding: the text attack needs one.")
