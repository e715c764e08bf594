"""One RAN training step as a loss: `ran_loss` for a plain PyTorch loop, and `RANTrainingWrapper`, which puts
it behind a model's `forward` so that any loop calling `model(**batch).loss` (the stock Trainer) trains RAN.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from ran_peft.attacks import (
    AttackBudget,
    AttackReport,
    TextPerturbation,
    attack_mode,
    input_gradients,
    pgd_perturb,
    running_statistics_frozen,
)
from ran_peft.config import RANConfig
from ran_peft.families import (
    DualEncoderFamily,
    FamilyOutput,
    ModelFamily,
    check_pixel_range,
    detect_family,
    token_embedding,
    unwrap_model,
)
from ran_peft.losses import covariance_offdiagonal, feature_consistency, rectification_kl, spectrum_flatness
from ran_peft.pixel_layout import BatchPixelBox, PixelLayout
from ran_peft.pixels import PixelBox

LOSS_PARTS = ("clean", "adversarial", "kl", "reference_kl", "consistency", "covariance", "spectrum")


@dataclass
class RANOutput(ModelOutput):
    """The loss of one RAN step, its parts (detached, for logging) and the clean logits (detached).

    For generative VLMs `logits` is None when the attack runs: their `[B, T, V]` logits are not kept past the clean
    pass (that would add one vocabulary-sized tensor to the step's peak memory); the KL keeps the answer rows only.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] | None = None
    adversarial_pixel_values: torch.Tensor | None = None
    counted_logits: torch.Tensor | None = None
    """Generative VLMs: the clean logits of the counted (answer) positions only, `[rows, V]` in row-major order of
    the family's `logits_mask` (detached); what TRL's per-token metrics read."""


def resolve_pixel_box(config: RANConfig, processor: Any = None, model: nn.Module | None = None) -> PixelBox:
    """The pixel normalisation: the config's `image_mean`/`image_std` first, then the processor's, then the one
    the model carries itself (open_clip's `visual.preprocess_cfg`)."""
    if config.image_mean is not None:
        return PixelBox(tuple(config.image_mean), tuple(config.image_std))
    box = PixelBox.from_processor(processor) if processor is not None else None
    if box is None and model is not None:
        from ran_peft.open_clip import open_clip_pixel_box

        box = open_clip_pixel_box(model)
    if box is None:
        raise ValueError(
            "RAN needs the pixel normalisation to turn its budget from pixel units into model units: pass the "
            "image processor (Trainer's `processing_class`, or `pixel_box=PixelBox.from_processor(processor)`), "
            "or set `image_mean` and `image_std` in RANConfig."
        )
    return box


class PixelIndependentWarning(UserWarning):
    """The model's loss does not depend on the pixels: the attack can change nothing."""


# Models already warned about (once each): a plain loop calls `ran_loss` every step.
_WARNED_PIXEL_INDEPENDENT: weakref.WeakSet = weakref.WeakSet()


def _warn_pixel_independent(model: nn.Module) -> None:
    if model in _WARNED_PIXEL_INDEPENDENT:
        return
    _WARNED_PIXEL_INDEPENDENT.add(model)
    warnings.warn(
        PixelIndependentWarning(
            f"the loss of {type(unwrap_model(model)).__name__} has an input gradient of exactly 0 with respect to "
            "`pixel_values`: its output does not depend on the image (e.g. a zero-initialised projector or "
            "cross-attention gates, or a vision path cut off). The attack cannot change anything, so the "
            "adversarial loss equals the clean one and the KL is 0: RAN trains like plain LoRA on this model until "
            "the pixels reach the output. Check that the vision tower is connected (and trained, if its link to "
            "the language model starts at zero)."
        ),
        stacklevel=3,
    )


def _require_logits(model: nn.Module, config: RANConfig, output: FamilyOutput) -> None:
    """Refuse the terms over the predictive distribution for a model that returns no logits (BLIP VQA)."""
    if output.logits is not None:
        return
    needs = [
        name
        for name, on in (
            ("kl_weight > 0", config.kl_weight > 0),
            ("attack_loss='kl'", config.attack_loss == "kl"),
            ("reference_kl_weight > 0", config.reference_kl_weight > 0),
        )
        if on
    ]
    if needs:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} returns no `logits` (its output holds only the loss and image "
            f"features), so RAN cannot compare its predictive distributions, which {' and '.join(needs)} need. "
            "Train it with the task losses alone: RANConfig(kl_weight=0, attack_loss='task')."
        )


def _feature_terms(config: RANConfig, features: torch.Tensor | None) -> dict[str, torch.Tensor]:
    terms = {}
    if config.covariance_weight > 0 or config.spectrum_weight > 0:
        if features is None:
            raise ValueError(
                "this model exposes no image features, so covariance/spectrum weights must be 0."
            )
        if config.covariance_weight > 0:
            terms["covariance"] = covariance_offdiagonal(features)
        if config.spectrum_weight > 0:
            terms["spectrum"] = spectrum_flatness(features, config.spectrum_top_k)
    return terms


def _reference_run(
    model: nn.Module, family: ModelFamily, forward, inputs, pixel_values, what: str
) -> FamilyOutput:
    """One no-grad pass of the adapter-disabled (pre-trained) model, deterministic like the attack."""
    disable_adapter = getattr(model, "disable_adapter", None)
    if disable_adapter is None:
        raise ValueError(
            f"{what} needs a PEFT model (the reference is the adapter-disabled model); got {type(model).__name__}."
        )
    with torch.no_grad(), attack_mode(model), disable_adapter():
        return family.run(forward, inputs, pixel_values.detach(), want_features=True)


def _reference_kl(
    model: nn.Module,
    family: ModelFamily,
    forward,
    inputs,
    pixel_values,
    output: FamilyOutput,
    config: RANConfig,
) -> torch.Tensor:
    """KL(p_0(pixels) || p_theta(pixels)): the prediction of the adapter-disabled model at the pixels `output` was
    computed on, against `output`'s (PMG-AFT-style)."""
    reference_logits = _reference_run(
        model, family, forward, inputs, pixel_values, "reference_kl_weight > 0"
    ).logits
    return rectification_kl(
        reference_logits,
        output.logits,
        output.logits_mask,
        temperature=config.kl_temperature,
        detach_clean=True,
    )


def _reference_features(model: nn.Module, family: ModelFamily, forward, inputs, pixel_values) -> torch.Tensor:
    features = _reference_run(model, family, forward, inputs, pixel_values, "consistency_weight > 0").features
    if features is None:
        raise ValueError("this model exposes no image features, so consistency_weight must be 0.")
    return features


def _is_fully_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) manages the model: its parameters' storage is freed between passes."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _gradient_surrogate(
    parameters: list[torch.Tensor], gradients: tuple[torch.Tensor | None, ...]
) -> torch.Tensor:
    """A term worth exactly 0 whose gradient with respect to each parameter is the given gradient."""
    total = None
    for parameter, gradient in zip(parameters, gradients, strict=True):
        if gradient is None:
            continue
        term = (parameter * gradient.to(parameter.dtype)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total - total.detach()


def _counted_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The flat indices of the rows a logits mask counts (None: every row counts)."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(1)


def _select_rows(logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`logits` `[..., V]` as `[len(rows), V]` (the counted rows only); unchanged when `rows` is None."""
    if rows is None:
        return logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, rows.to(logits.device))


class _RowsWithSparseGradient(torch.autograd.Function):
    """`logits` `[..., V]` -> the rows `rows` (flat indices, sorted) as `[len(rows), V]`, whose gradient goes back as a
    sparse tensor holding only those rows.

    Use it only on logits that also get a dense gradient from elsewhere (the model's own task loss): autograd then adds
    the sparse rows in place into that gradient, where `index_select`'s backward would allocate one more dense
    `[..., V]` buffer (on a generative VLM, as large as the logits). Alone, the sparse gradient could not flow back.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.logits_shape = logits.shape
        ctx.save_for_backward(rows)
        return logits.reshape(-1, logits.shape[-1]).index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        shape = ctx.logits_shape
        indices = torch.stack(torch.unravel_index(rows, shape[:-1]))  # sorted rows: already coalesced
        sparse = torch.sparse_coo_tensor(
            indices, grad.contiguous(), size=shape, is_coalesced=True, check_invariants=False
        )
        return sparse, None


def ran_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    config: RANConfig,
    *,
    pixel_box: PixelBox | None = None,
    step: int = 0,
    forward=None,
    family: ModelFamily | None = None,
    class_text_inputs: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    pixel_layout: str | PixelLayout | None = None,
    processor: Any = None,
) -> RANOutput:
    """The RAN loss of one batch. Call `.loss.backward()` on the result, as with any model output.

    `step` is the optimiser step (it drives the noise warm-up). `forward` is what runs the model (default: the
    model itself). With `epsilon=0`, `text_epsilon=0` and every rectification weight 0 this is the task loss.
    `pixel_layout` (default: `config.pixel_layout`) and `processor` (its patch sizes) place the batch's channels
    and padding (see `ran_peft.pixel_layout`).
    """
    family = family or detect_family(model, class_text_inputs)
    forward = forward or model
    inputs = dict(inputs)
    num_items_in_batch = inputs.pop("num_items_in_batch", None)
    box = pixel_box or resolve_pixel_box(config, processor)
    family.check_inputs(inputs)
    placed = BatchPixelBox.place(box, inputs, pixel_layout or config.pixel_layout, processor)
    check_pixel_range(inputs["pixel_values"], placed)
    extra = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
    # When the Trainer passes `num_items_in_batch`, the model normalises its task loss over the whole accumulated
    # batch; our own terms are batch means, so they get this batch's share of the items.
    share = family.count_items(inputs) / float(num_items_in_batch) if num_items_in_batch else 1.0

    ramp = config.ramp(step)
    epsilon, text_epsilon = config.epsilon * ramp, config.text_epsilon * ramp
    kl_weight = config.kl_weight * ramp
    mix = config.adversarial_weight
    clean_weight, adversarial_weight = config.task_weight * (1 - mix), config.task_weight * mix
    pixel_values = inputs["pixel_values"]
    wants_features = config.covariance_weight > 0 or config.spectrum_weight > 0
    parts: dict[str, torch.Tensor] = {}

    if epsilon == 0 and text_epsilon == 0:
        want_features = wants_features or config.consistency_weight > 0
        clean = family.run(forward, inputs, pixel_values, want_features=want_features, extra=extra)
        loss = clean.loss if config.task_weight == 1 else config.task_weight * clean.loss
        parts["clean"] = clean.loss.detach()
        for name, term in _feature_terms(config, clean.features).items():
            loss = loss + share * getattr(config, f"{name}_weight") * term
            parts[name] = term.detach()
        if config.consistency_weight > 0:
            reference = _reference_features(model, family, forward, inputs, pixel_values)
            if clean.features is None:
                raise ValueError("this model exposes no image features, so consistency_weight must be 0.")
            term = feature_consistency(
                clean.features, reference
            )  # no perturbation: the clean pass's features
            loss = loss + share * config.consistency_weight * term
            parts["consistency"] = term.detach()
        if (
            config.reference_kl_weight > 0
        ):  # no perturbation: the KL to the pre-trained model at the clean input
            term = _reference_kl(model, family, forward, inputs, pixel_values, clean, config)
            loss = loss + share * config.reference_kl_weight * term
            parts["reference_kl"] = term.detach()
        return RANOutput(
            loss=loss,
            logits=clean.logits.detach() if clean.logits is not None else None,
            parts=parts,
            adversarial_pixel_values=pixel_values,
        )

    text = TextPerturbation(token_embedding(model), text_epsilon) if text_epsilon > 0 else None
    text_context = (
        text.active if text is not None else (lambda track_gradient=False: contextlib.nullcontext())
    )

    # 1. Clean pass. With a free start its backward runs now: one pass gives the input gradient (the attack's
    #    first step) and the clean loss's parameter gradients (carried into the final loss by a surrogate).
    #    Plain PGD adversarial training (no clean term, no KL, no free start) skips it.
    free = config.free_start
    needs_clean = (
        free or clean_weight > 0 or config.kl_weight > 0 or wants_features or config.attack_loss == "kl"
    )
    first_gradient = first_text_gradient = None
    clean = None
    loss = torch.zeros((), device=pixel_values.device)
    if needs_clean:
        clean_pixels = pixel_values.detach().requires_grad_(free)
        with text_context(track_gradient=free):
            clean = family.run(forward, inputs, clean_pixels, want_features=wants_features, extra=extra)
        _require_logits(model, config, clean)
    feature_terms = _feature_terms(config, clean.features) if clean is not None else {}
    # Only the KL reads the clean logits again, and only its counted rows (a generative VLM's answer tokens, a small
    # share of its [B, T, V] logits): keep those rows and let the rest go before the clean backward (the loss's
    # graph does not hold the logits themselves) and the adversarial pass.
    clean_logits = kl_rows = returned_logits = counted_logits = None
    if clean is not None:
        kl_rows = _counted_rows(clean.logits_mask)
        if config.kl_weight > 0 or config.attack_loss == "kl":
            clean_logits = _select_rows(clean.logits.detach() if free else clean.logits, kl_rows)
        if kl_rows is None and clean.logits is not None:  # small logits (classes, or an in-batch similarity
            returned_logits = clean.logits.detach()  # matrix): returned as they are
        elif kl_rows is not None:
            counted_logits = (
                clean_logits.detach()
                if clean_logits is not None
                else _select_rows(clean.logits.detach(), kl_rows)
            )
        clean = replace(clean, logits=None)
    if clean is not None and free:
        trainable = [p for p in model.parameters() if p.requires_grad] if clean_weight > 0 else []
        if trainable and _is_fully_sharded(model):
            raise ValueError(
                "RANConfig.free_start=True takes the clean loss's parameter gradients with torch.autograd.grad, "
                "which FSDP2 (`fully_shard`) parameters do not support (torch crashes); set free_start=False."
            )
        text_targets = [text.delta] if text is not None and text.delta is not None else []
        gradients = input_gradients(
            clean.loss,
            [clean_pixels, *text_targets, *trainable],
            allow_unused=True,
            retain_graph=bool(feature_terms),
        )
        first_gradient = gradients[0]
        if text_targets:
            first_text_gradient = gradients[1]
        if trainable:
            loss = loss + clean_weight * (_gradient_surrogate(trainable, gradients[1 + len(text_targets) :]))
        loss = loss + clean_weight * clean.loss.detach()
    elif clean is not None:
        loss = loss + clean_weight * clean.loss
    if clean is not None:
        parts["clean"] = clean.loss.detach()
        clean = None
    for name, term in feature_terms.items():
        loss = loss + share * getattr(config, f"{name}_weight") * term
        parts[name] = term.detach()

    # 2. Attack: the deterministic model, input gradients only.
    budget = AttackBudget(
        epsilon=epsilon,
        step_size=config.resolved_step_size * ramp,
        steps=config.attack_steps,
        norm=config.attack_norm,
        random_start=config.random_start,
        text_epsilon=text_epsilon,
        text_step_size=config.resolved_text_step_size * ramp,
    )
    if text is not None:
        text.detach()
        text.step(first_text_gradient, budget.text_step_size)

    reference = None
    if config.consistency_weight > 0 or config.attack_loss == "consistency":
        reference = _reference_features(model, family, forward, inputs, pixel_values)

    def attack_objective(adversarial_pixels: torch.Tensor, text_perturbation) -> torch.Tensor:
        features_attack = config.attack_loss == "consistency"
        with text_context(track_gradient=True):
            attacked = family.run(forward, inputs, adversarial_pixels, want_features=features_attack)
        if features_attack:
            return feature_consistency(attacked.features, reference)
        if config.attack_loss == "kl":
            return rectification_kl(
                clean_logits.detach(),
                _select_rows(attacked.logits, kl_rows),
                attacked.logits_mask if kl_rows is None else None,
            )
        return attacked.loss

    attack_report = AttackReport()
    with attack_mode(model):
        adversarial_pixels = pgd_perturb(
            attack_objective,
            pixel_values,
            placed,
            budget,
            first_gradient=first_gradient,
            text=text,
            generator=generator,
            report=attack_report,
        )
    if attack_report.pixel_gradient_zero and epsilon > 0:
        _warn_pixel_independent(model)

    # 3. Adversarial pass and rectification.
    statistics = (
        running_statistics_frozen(model)
        if config.adversarial_batch_statistics == "batch_only"
        else contextlib.nullcontext()
    )
    with text_context(track_gradient=False), statistics:
        adversarial: FamilyOutput = family.run(
            forward, inputs, adversarial_pixels, want_features=config.consistency_weight > 0, extra=extra
        )
    _require_logits(model, config, adversarial)
    if adversarial_weight > 0:
        loss = loss + adversarial_weight * adversarial.loss
    parts["adversarial"] = adversarial.loss.detach()
    if config.kl_weight > 0:
        if kl_rows is not None and adversarial_weight > 0 and adversarial.loss.requires_grad:
            # The adversarial task loss sends a dense gradient to these logits: the KL's rows join it in place.
            rows = kl_rows.to(adversarial.logits.device)
            adversarial_rows = _RowsWithSparseGradient.apply(adversarial.logits, rows)
        else:
            adversarial_rows = _select_rows(adversarial.logits, kl_rows)
        kl = rectification_kl(
            clean_logits,
            adversarial_rows,
            adversarial.logits_mask if kl_rows is None else None,
            temperature=config.kl_temperature,
            detach_clean=free,
        )
        loss = loss + share * kl_weight * kl
        parts["kl"] = kl.detach()
    if config.reference_kl_weight > 0:
        term = _reference_kl(model, family, forward, inputs, adversarial_pixels, adversarial, config)
        loss = loss + share * config.reference_kl_weight * term
        parts["reference_kl"] = term.detach()
    if config.consistency_weight > 0:
        term = feature_consistency(adversarial.features, reference)
        loss = loss + share * config.consistency_weight * term
        parts["consistency"] = term.detach()
    parts["epsilon"] = torch.tensor(epsilon)
    parts["attack_skipped"] = torch.tensor(float(attack_report.skipped))
    if not needs_clean and adversarial.logits is not None:
        if adversarial.logits_mask is None:
            returned_logits = adversarial.logits.detach()
        else:
            counted_logits = _select_rows(adversarial.logits.detach(), _counted_rows(adversarial.logits_mask))
    return RANOutput(
        loss=loss,
        logits=returned_logits,
        parts=parts,
        adversarial_pixel_values=adversarial_pixels,
        counted_logits=counted_logits,
    )


class RANTrainingWrapper:
    """Puts `ran_loss` behind `model.forward` while the model trains; `remove()` restores the plain forward.

    In training mode (with gradients on) a call returns the RAN loss; otherwise it is the model's own forward, so
    evaluation and inference cost exactly what the LoRA model costs. Dual encoders with `labels` get their
    prompt-classification loss in evaluation too.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RANConfig,
        pixel_box: PixelBox,
        class_text_inputs: Mapping[str, torch.Tensor] | None = None,
        pixel_layout: str | PixelLayout | None = None,
        processor: Any = None,
    ):
        if isinstance(model.__dict__.get("forward"), _WrappedForward):
            raise RuntimeError(
                "this model is already wrapped for RAN training; remove the first wrapper first."
            )
        self.model = model
        self.config = config
        self.pixel_box = pixel_box
        self.pixel_layout = pixel_layout
        self.processor = processor
        self.family = detect_family(model, class_text_inputs)
        self.step = 0
        self._original_forward = model.forward
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        model.forward = _WrappedForward(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("RAN training passes the batch by keyword: call model(**batch).")
        if self.model.training and torch.is_grad_enabled():
            # TRL's SFTTrainer asks for per-token log-probabilities (`fused_lm_head=True`) and makes its own loss.
            fused = "fused_lm_head" in kwargs
            if fused:
                from ran_peft.trl import fused_lm_head_output, split_fused_request

                fused, kwargs = split_fused_request(kwargs)
            output = ran_loss(
                self.model,
                kwargs,
                self.config,
                pixel_box=self.pixel_box,
                step=self.step,
                forward=self._original_forward,
                family=self.family,
                pixel_layout=self.pixel_layout,
                processor=self.processor,
            )
            self._record(output.parts)
            if fused:
                return fused_lm_head_output(
                    output.loss, output, kwargs["labels"], kwargs.get("num_items_in_batch")
                )
            return output
        if self.family.routes_every_call or (
            isinstance(self.family, DualEncoderFamily) and kwargs.get("labels") is not None
        ):
            kwargs.pop("num_items_in_batch", None)
            result = self.family.run(self._original_forward, kwargs, kwargs["pixel_values"])
            return RANOutput(loss=result.loss, logits=result.logits)
        return self._original_forward(*args, **kwargs)

    def _record(self, parts: Mapping[str, torch.Tensor]) -> None:
        for name, value in parts.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._count += 1

    def pop_logged_parts(self) -> dict[str, float]:
        """The mean of each loss part since the last call (and reset)."""
        if self._count == 0:
            return {}
        means = {f"ran/{name}": float(total) / self._count for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means

    def remove(self) -> None:
        """Give the model its own `forward` back (what `RANCallback` does when training ends)."""
        if isinstance(self.model.__dict__.get("forward"), _WrappedForward):
            del self.model.forward


class _WrappedForward:
    """The callable installed as `model.forward` (a marker type, so wrapping twice is caught)."""

    def __init__(self, wrapper: RANTrainingWrapper):
        self.wrapper = wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(*args, **kwargs)
