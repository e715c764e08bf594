"""One RAN training step as a loss: `ran_loss` for a plain PyTorch loop, and `RANTrainingWrapper`, which puts
it behind a model's `forward` so that any loop calling `model(**batch).loss` (the stock Trainer) trains RAN.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
from ran_peft.kernels.pgd import pgd_step
from ran_peft.losses import covariance_offdiagonal, feature_consistency, rectification_kl, spectrum_flatness
from ran_peft.pixel_layout import BatchPixelBox, PixelLayout, unattacked_pixel_keys
from ran_peft.pixels import PixelBox
from ran_peft.recipe_memory import RecipeMemory, Replay

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
    labels: torch.Tensor | None = None
    """Free AT's replays (`free_replay`): the labels of the batch the loss belongs to (the replayed one, not the
    batch passed in), which TRL's per-token metrics read with `counted_logits`."""


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


class UnattackedPixelsWarning(UserWarning):
    """The batch holds pixels besides `pixel_values` (video frames, a high-resolution copy): they stay clean."""


_WARNED_UNATTACKED: weakref.WeakSet = weakref.WeakSet()


def _warn_unattacked_pixels(model: nn.Module, keys: list[str]) -> None:
    if model in _WARNED_UNATTACKED:
        return
    _WARNED_UNATTACKED.add(model)
    names = ", ".join(f"`{key}`" for key in keys)
    video = any("video" in key for key in keys)
    warnings.warn(
        UnattackedPixelsWarning(
            f"RAN attacks `pixel_values` only: {names} in the batches of {type(unwrap_model(model)).__name__} "
            f"stay clean ({'video frames: ' if video else ''}not perturbed, not in the budget), so the model is "
            "trained against adversarial images but not against adversarial "
            f"{'frames' if video else 'copies of them'}. To attack "
            f"{'frames' if video else 'them'}, give them to the processor as images (`images=`), so that they "
            "arrive in `pixel_values`; to train on them clean without this warning, filter "
            "`ran_peft.UnattackedPixelsWarning`."
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


def _reference_features(state: RANStep) -> torch.Tensor:
    """The adapter-disabled (pre-trained) model's clean image features, deterministic like the attack: through the
    whole model, or through the vision tower alone (`adversarial_pass='image_features'`)."""
    if state.config.adversarial_pass == "image_features":
        disable_adapter = getattr(state.model, "disable_adapter", None)
        if disable_adapter is None:
            raise ValueError(
                "consistency_weight > 0 needs a PEFT model (the reference is the adapter-disabled model); got "
                f"{type(state.model).__name__}."
            )
        with torch.no_grad(), attack_mode(state.model), disable_adapter():
            return state.family.image_features(state.model, state.inputs, state.pixel_values.detach())
    features = _reference_run(
        state.model, state.family, state.forward, state.inputs, state.pixel_values, "consistency_weight > 0"
    ).features
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


@dataclass(eq=False)
class RANStep:
    """What one RAN step carries from phase to phase: the batch and its placement, the weights in force at this step,
    the loss so far and its logged parts, and what later phases read (clean logits, the attack's start, references).

    Each phase (`clean_only_phase`, `clean_phase`, `attack_phase`, `adversarial_phase`, `rectification_phase`) is a
    function of this state: a new recipe adds a phase or a setting, not a branch in one long body.
    """

    model: nn.Module
    config: RANConfig
    family: ModelFamily
    forward: Any
    inputs: dict[str, Any]
    box: PixelBox
    layout: str | PixelLayout
    processor: Any
    placed: BatchPixelBox
    extra: dict[str, Any]
    share: float  # this batch's share of the Trainer's accumulated items (1 without `num_items_in_batch`)
    ramp: float  # the noise warm-up's share of the targets at this step
    generator: torch.Generator | None = None
    memory: RecipeMemory | None = None
    text: TextPerturbation | None = None
    clean_pixel_values: torch.Tensor | None = None  # the whole batch's pixels, when only a share is attacked
    attacked_samples: torch.Tensor | None = None  # which samples are attacked (`adversarial_fraction` < 1)
    loss: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    clean_logits: torch.Tensor | None = None  # the KL's clean rows (counted rows only)
    kl_rows: torch.Tensor | None = None
    returned_logits: torch.Tensor | None = None
    counted_logits: torch.Tensor | None = None
    first_gradient: torch.Tensor | None = None  # the free start's input gradient (the attack's first step)
    first_text_gradient: torch.Tensor | None = None
    reference_features: torch.Tensor | None = None
    adversarial_pixels: torch.Tensor | None = None
    adversarial: FamilyOutput | None = None
    attack_report: AttackReport = field(default_factory=AttackReport)

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.inputs["pixel_values"]

    @property
    def epsilon(self) -> float:
        return self.config.epsilon * self.ramp

    @property
    def text_epsilon(self) -> float:
        return self.config.text_epsilon * self.ramp

    @property
    def clean_weight(self) -> float:
        return self.config.task_weight * (1 - self.config.adversarial_weight)

    @property
    def adversarial_weight(self) -> float:
        return self.config.task_weight * self.config.adversarial_weight

    @property
    def wants_features(self) -> bool:
        """Whether the clean pass must return image features (the covariance and spectrum terms read them)."""
        return self.config.covariance_weight > 0 or self.config.spectrum_weight > 0

    def text_context(self, track_gradient: bool = False):
        return self.text.active(track_gradient) if self.text is not None else contextlib.nullcontext()

    def add(self, term: torch.Tensor, weight: float) -> None:
        """Add `weight * term` to the loss (`weight` already a Python number)."""
        self.loss = weight * term if self.loss is None else self.loss + weight * term

    def add_part(self, name: str, term: torch.Tensor, weight: float) -> None:
        """Add a batch-mean term at this batch's share of the items, and log it under `name`."""
        self.add(term, self.share * weight)
        self.parts[name] = term.detach()


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
    memory: RecipeMemory | None = None,
) -> RANOutput:
    """The RAN loss of one batch. Call `.loss.backward()` on the result, as with any model output.

    `step` is the optimiser step (it drives the noise warm-up and `attack_every`). `forward` is what runs the model
    (default: the model itself). With `epsilon=0`, `text_epsilon=0` and every rectification weight 0 this is the
    task loss. `pixel_layout` (default: `config.pixel_layout`) and `processor` (its patch sizes) place the batch's
    channels and padding (see `ran_peft.pixel_layout`). `memory` keeps what `carry_perturbations` and
    `free_replay` need from one step to the next (`RANTrainingWrapper` keeps one).
    """
    family = family or detect_family(model, class_text_inputs)
    state = prepare_step(model, inputs, config, family, pixel_box, pixel_layout, processor, step)
    state.forward, state.generator, state.memory = forward or model, generator, memory
    if config.free_replay > 1:
        return free_replay_phase(state)
    if (state.epsilon == 0 and state.text_epsilon == 0) or step % config.attack_every != 0:
        return clean_only_phase(state)
    clean_phase(state)
    if config.adversarial_fraction < 1:
        boundary_phase(state)
    attack_phase(state)
    adversarial_phase(state)
    rectification_phase(state)
    return finish_step(state)


def prepare_step(
    model: nn.Module,
    inputs: Mapping[str, Any],
    config: RANConfig,
    family: ModelFamily,
    pixel_box: PixelBox | None,
    pixel_layout: str | PixelLayout | None,
    processor: Any,
    step: int,
) -> RANStep:
    """Check and place the batch, and set the weights in force at `step`."""
    inputs = dict(inputs)
    num_items_in_batch = inputs.pop("num_items_in_batch", None)
    box = pixel_box or resolve_pixel_box(config, processor)
    family.check_inputs(inputs)
    unattacked = unattacked_pixel_keys(inputs)
    if unattacked:
        _warn_unattacked_pixels(model, unattacked)
    layout = pixel_layout or config.pixel_layout
    placed = BatchPixelBox.place(box, inputs, layout, processor)
    check_pixel_range(inputs["pixel_values"], placed)
    # When the Trainer passes `num_items_in_batch`, the model normalises its task loss over the whole accumulated
    # batch; our own terms are batch means, so they get this batch's share of the items.
    share = family.count_items(inputs) / float(num_items_in_batch) if num_items_in_batch else 1.0
    state = RANStep(
        model=model,
        config=config,
        family=family,
        forward=model,
        inputs=inputs,
        box=box,
        layout=layout,
        processor=processor,
        placed=placed,
        extra={"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {},
        share=share,
        ramp=config.ramp(step),
    )
    if state.text_epsilon > 0:
        state.text = TextPerturbation(token_embedding(model), state.text_epsilon)
    return state


def clean_only_phase(state: RANStep) -> RANOutput:
    """No attack at this step (no budget yet, or none at all): the task loss and the terms that need no attack."""
    config, pixel_values = state.config, state.pixel_values
    want_features = state.wants_features or config.consistency_weight > 0
    clean = state.family.run(
        state.forward, state.inputs, pixel_values, want_features=want_features, extra=state.extra
    )
    state.loss = clean.loss if config.task_weight == 1 else config.task_weight * clean.loss
    state.parts["clean"] = clean.loss.detach()
    for name, term in _feature_terms(config, clean.features).items():
        state.add_part(name, term, getattr(config, f"{name}_weight"))
    if config.consistency_weight > 0:
        reference = _reference_features(state)
        if clean.features is None:
            raise ValueError("this model exposes no image features, so consistency_weight must be 0.")
        # No perturbation: the clean pass's features against the pre-trained model's.
        state.add_part(
            "consistency", feature_consistency(clean.features, reference), config.consistency_weight
        )
    if config.reference_kl_weight > 0:  # no perturbation: the KL to the pre-trained model at the clean input
        term = _reference_kl(
            state.model, state.family, state.forward, state.inputs, pixel_values, clean, config
        )
        state.add_part("reference_kl", term, config.reference_kl_weight)
    return RANOutput(
        loss=state.loss,
        logits=clean.logits.detach() if clean.logits is not None else None,
        parts=state.parts,
        adversarial_pixel_values=pixel_values,
    )


def _needs_clean_pass(state: RANStep) -> bool:
    """Plain PGD adversarial training (no clean term, no KL, no free start, no feature terms) skips the clean pass."""
    config = state.config
    return (
        config.free_start
        or state.clean_weight > 0
        or config.kl_weight > 0
        or state.wants_features
        or config.attack_loss == "kl"
    )


def clean_phase(state: RANStep) -> None:
    """The clean pass. With a free start its backward runs now: one pass gives the input gradient (the attack's first
    step) and the clean loss's parameter gradients (carried into the final loss by a surrogate)."""
    config, free = state.config, state.config.free_start
    state.loss = torch.zeros((), device=state.pixel_values.device)
    if not _needs_clean_pass(state):
        return
    clean_pixels = state.pixel_values.detach().requires_grad_(free)
    with state.text_context(track_gradient=free):
        clean = state.family.run(
            state.forward, state.inputs, clean_pixels, want_features=state.wants_features, extra=state.extra
        )
    _require_logits(state.model, config, clean)
    feature_terms = _feature_terms(config, clean.features)
    _keep_clean_logits(state, clean)
    clean = replace(clean, logits=None)
    if free:
        _free_start_gradients(state, clean, clean_pixels, retain_graph=bool(feature_terms))
    else:
        state.add(clean.loss, state.clean_weight)
    state.parts["clean"] = clean.loss.detach()
    for name, term in feature_terms.items():
        state.add_part(name, term, getattr(config, f"{name}_weight"))


def _keep_clean_logits(state: RANStep, clean: FamilyOutput) -> None:
    """Keep the clean logits' counted rows for the KL, and what the step returns.

    Only the KL reads the clean logits again, and only its counted rows (a generative VLM's answer tokens, a small
    share of its [B, T, V] logits): the rest goes before the clean backward (the loss's graph does not hold the
    logits themselves) and the adversarial pass.
    """
    config = state.config
    state.kl_rows = _counted_rows(clean.logits_mask)
    if config.kl_weight > 0 or config.attack_loss == "kl":
        logits = clean.logits.detach() if config.free_start else clean.logits
        state.clean_logits = _select_rows(logits, state.kl_rows)
    if state.kl_rows is None and clean.logits is not None:
        # Small logits (classes, or an in-batch similarity matrix): returned as they are.
        state.returned_logits = clean.logits.detach()
    elif state.kl_rows is not None:
        state.counted_logits = (
            state.clean_logits.detach()
            if state.clean_logits is not None
            else _select_rows(clean.logits.detach(), state.kl_rows)
        )


def _free_start_gradients(
    state: RANStep, clean: FamilyOutput, clean_pixels: torch.Tensor, retain_graph: bool
) -> None:
    """One backward of the clean loss: the attack's first input gradient(s), and the clean term's parameter
    gradients, which enter the loss through a surrogate worth 0."""
    model, clean_weight = state.model, state.clean_weight
    trainable = [p for p in model.parameters() if p.requires_grad] if clean_weight > 0 else []
    if trainable and _is_fully_sharded(model):
        raise ValueError(
            "RANConfig.free_start=True takes the clean loss's parameter gradients with torch.autograd.grad, "
            "which FSDP2 (`fully_shard`) parameters do not support (torch crashes); set free_start=False."
        )
    text = state.text
    text_targets = [text.delta] if text is not None and text.delta is not None else []
    gradients = input_gradients(
        clean.loss, [clean_pixels, *text_targets, *trainable], allow_unused=True, retain_graph=retain_graph
    )
    state.first_gradient = gradients[0]
    if text_targets:
        state.first_text_gradient = gradients[1]
    if trainable:
        state.add(_gradient_surrogate(trainable, gradients[1 + len(text_targets) :]), clean_weight)
    state.add(clean.loss.detach(), clean_weight)


def attack_phase(state: RANStep) -> None:
    """The attack: the deterministic model, input gradients only; sets `state.adversarial_pixels`."""
    config, ramp = state.config, state.ramp
    budget = AttackBudget(
        epsilon=state.epsilon,
        step_size=config.resolved_step_size * ramp,
        steps=config.attack_steps,
        norm=config.attack_norm,
        random_start=config.random_start,
        text_epsilon=state.text_epsilon,
        text_step_size=config.resolved_text_step_size * ramp,
    )
    if state.text is not None:
        state.text.detach()
        state.text.step(state.first_text_gradient, budget.text_step_size)
    if config.consistency_weight > 0 or config.attack_loss == "consistency":
        state.reference_features = _reference_features(state)
    start = start_rows = keys = None
    if config.carry_perturbations:
        keys = RecipeMemory.sample_keys(_per_sample_pixels(state, "carry_perturbations=True"))
        start, start_rows = _memory(state, "carry_perturbations=True").recall(keys, state.pixel_values)
    with attack_mode(state.model):
        state.adversarial_pixels = pgd_perturb(
            lambda pixels, _text: _attack_objective(state, pixels),
            state.pixel_values,
            state.placed,
            budget,
            first_gradient=state.first_gradient,
            text=state.text,
            generator=state.generator,
            report=state.attack_report,
            start=start,
            start_rows=start_rows,
        )
    if keys is not None:
        state.memory.remember(keys, state.adversarial_pixels - state.pixel_values.detach())
    if state.attack_report.pixel_gradient_zero and state.epsilon > 0:
        _warn_pixel_independent(state.model)


def _memory(state: RANStep, setting: str) -> RecipeMemory:
    if state.memory is None:
        raise ValueError(
            f"RANConfig.{setting} keeps state from one step to the next: pass `memory=RecipeMemory()` to ran_loss "
            "(and the same one at every step; RANTrainingWrapper and RANCallback keep one for you)."
        )
    return state.memory


def _per_sample_pixels(state: RANStep, setting: str) -> torch.Tensor:
    """`pixel_values` when each sample is one entry of its first axis (channel-first images), else a clear error."""
    pixel_values = state.pixel_values
    if state.placed.placement.layout != "channels_first" or state.placed.placement.sample_ndim is None:
        raise ValueError(
            f"RANConfig.{setting} needs one sample per entry of the first axis of `pixel_values` (channel-first "
            f"images); this batch's pixels are laid out as {state.placed.placement.layout!r} with shape "
            f"{tuple(pixel_values.shape)}."
        )
    return pixel_values


def _attack_objective(state: RANStep, adversarial_pixels: torch.Tensor) -> torch.Tensor:
    """What the attack maximises (`RANConfig.attack_loss`)."""
    attack_loss = state.config.attack_loss
    if state.config.adversarial_pass == "image_features" and attack_loss == "consistency":
        features = state.family.image_features(state.model, state.inputs, adversarial_pixels)
        return feature_consistency(features, state.reference_features)
    features_attack = attack_loss == "consistency"
    with state.text_context(track_gradient=True):
        attacked = state.family.run(
            state.forward, state.inputs, adversarial_pixels, want_features=features_attack
        )
    if features_attack:
        return feature_consistency(attacked.features, state.reference_features)
    if attack_loss == "kl":
        return rectification_kl(
            state.clean_logits.detach(),
            _select_rows(attacked.logits, state.kl_rows),
            attacked.logits_mask if state.kl_rows is None else None,
        )
    return attacked.loss


def adversarial_phase(state: RANStep) -> None:
    """The adversarial training pass and its task loss (with `adversarial_pass='image_features'`: the image
    features alone, for the consistency term)."""
    config = state.config
    statistics = (
        running_statistics_frozen(state.model)
        if config.adversarial_batch_statistics == "batch_only"
        else contextlib.nullcontext()
    )
    if config.adversarial_pass == "image_features":
        with statistics:
            features = state.family.image_features(state.model, state.inputs, state.adversarial_pixels)
        state.adversarial = FamilyOutput(None, None, None, features)
        return
    with state.text_context(track_gradient=False), statistics:
        state.adversarial = state.family.run(
            state.forward,
            state.inputs,
            state.adversarial_pixels,
            want_features=config.consistency_weight > 0,
            extra=state.extra,
        )
    _require_logits(state.model, config, state.adversarial)
    if state.adversarial_weight > 0:
        # A share of the batch (`adversarial_fraction`): its loss is a mean over those samples, at the batch's share
        # of the accumulated items, like the other batch-mean terms.
        weight = state.adversarial_weight * (state.share if state.attacked_samples is not None else 1.0)
        state.add(state.adversarial.loss, weight)
    state.parts["adversarial"] = state.adversarial.loss.detach()


def rectification_phase(state: RANStep) -> None:
    """The rectification terms on the adversarial pass: KL to the clean prediction, KL to the pre-trained model's
    prediction, and the features' distance to the pre-trained model's clean features."""
    config, adversarial = state.config, state.adversarial
    if config.kl_weight > 0:
        kl = rectification_kl(
            state.clean_logits,
            _adversarial_kl_rows(state),
            adversarial.logits_mask if state.kl_rows is None else None,
            temperature=config.kl_temperature,
            detach_clean=config.free_start,
        )
        state.add_part("kl", kl, config.kl_weight * state.ramp)
    if config.reference_kl_weight > 0:
        term = _reference_kl(
            state.model,
            state.family,
            state.forward,
            state.inputs,
            state.adversarial_pixels,
            adversarial,
            config,
        )
        state.add_part("reference_kl", term, config.reference_kl_weight)
    if config.consistency_weight > 0:
        term = feature_consistency(adversarial.features, state.reference_features)
        state.add_part("consistency", term, config.consistency_weight)


def _adversarial_kl_rows(state: RANStep) -> torch.Tensor:
    """The adversarial logits' counted rows for the KL."""
    return _kl_rows(state.adversarial, state.kl_rows, dense_gradient=state.adversarial_weight > 0)


def _kl_rows(output: FamilyOutput, rows: torch.Tensor | None, dense_gradient: bool) -> torch.Tensor:
    """`output`'s counted logit rows for the KL. `dense_gradient`: the output's task loss is in the step's loss too."""
    if rows is not None and dense_gradient and output.loss.requires_grad:
        # The task loss sends a dense gradient to these logits: the KL's rows join it in place.
        return _RowsWithSparseGradient.apply(output.logits, rows.to(output.logits.device))
    return _select_rows(output.logits, rows)


def finish_step(state: RANStep) -> RANOutput:
    """The step's output: the loss, its logged parts, and the logits the caller may read."""
    state.parts["epsilon"] = torch.tensor(state.epsilon)
    state.parts["attack_skipped"] = torch.tensor(float(state.attack_report.skipped))
    adversarial = state.adversarial
    if not _needs_clean_pass(state) and adversarial.logits is not None:
        if adversarial.logits_mask is None:
            state.returned_logits = adversarial.logits.detach()
        else:
            state.counted_logits = _select_rows(
                adversarial.logits.detach(), _counted_rows(adversarial.logits_mask)
            )
    adversarial_pixels = state.adversarial_pixels
    if state.attacked_samples is not None:  # the samples left out keep their clean pixels
        adversarial_pixels = state.clean_pixel_values.detach().clone()
        adversarial_pixels[state.attacked_samples] = state.adversarial_pixels
    return RANOutput(
        loss=state.loss,
        logits=state.returned_logits,
        parts=state.parts,
        adversarial_pixel_values=adversarial_pixels,
        counted_logits=state.counted_logits,
    )


def boundary_phase(state: RANStep) -> None:
    """Keep for the attack and the adversarial pass only the `adversarial_fraction` of the batch with the smallest
    clean margin (correct class logit minus the best other one): the samples nearest the decision boundary."""
    config, logits, labels = state.config, state.returned_logits, state.inputs.get("labels")
    if logits is None or labels is None or logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"RANConfig.adversarial_fraction={config.adversarial_fraction} ranks samples by their clean margin, which "
            "needs per-sample class logits `[B, C]` and `labels` `[B]` (image classifiers, dual encoders with class "
            "prompts); this model's batch has none. Use attack_every or adversarial_pass='image_features' instead."
        )
    batch = logits.shape[0]
    pixel_values = _per_sample_pixels(state, f"adversarial_fraction={config.adversarial_fraction}")
    labels = labels.to(logits.device)
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    count = max(1, math.ceil(config.adversarial_fraction * batch))
    chosen = (correct - others).topk(count, largest=False).indices.sort().values
    state.inputs = _select_samples(state.inputs, chosen.to(pixel_values.device), batch)
    state.placed = BatchPixelBox.place(state.box, state.inputs, state.layout, state.processor)
    state.clean_pixel_values, state.attacked_samples = pixel_values, chosen.to(pixel_values.device)
    state.extra = {}  # the model's own normalisation is over the whole batch; the adversarial term scales by share
    if state.first_gradient is not None:
        state.first_gradient = state.first_gradient[state.attacked_samples]
    if state.clean_logits is not None:
        state.clean_logits = state.clean_logits[chosen]
    state.parts["attacked_share"] = torch.tensor(count / batch)


def _select_samples(inputs: Mapping[str, Any], samples: torch.Tensor, batch: int) -> dict[str, Any]:
    """The batch's entries for `samples` (indices on the first axis); class prompts, shared by every sample, stay."""
    shared = {"class_input_ids", "class_attention_mask"}
    selected = {}
    for key, value in inputs.items():
        if key in shared or not torch.is_tensor(value) or value.dim() == 0:
            selected[key] = value
        elif value.shape[0] == batch:
            selected[key] = value[samples.to(value.device)]
        else:
            raise ValueError(
                f"RANConfig.adversarial_fraction < 1 takes a share of the batch's samples, but `{key}` has shape "
                f"{tuple(value.shape)}, whose first axis is not the batch ({batch} samples)."
            )
    return selected


def free_replay_phase(state: RANStep) -> RANOutput:
    """Free adversarial training: one forward/backward per call. A new batch's first replay is its clean step; each
    later call replays that batch perturbed by the previous backward's input gradient (the batch passed in is not
    used), with the adversarial task loss plus the KL to the clean replay's cached predictions."""
    config, memory = state.config, _memory(state, f"free_replay={state.config.free_replay}")
    replay = memory.replay
    if replay is None or replay.remaining == 0:
        pixels = state.pixel_values.detach().requires_grad_(True)
        output = state.family.run(state.forward, state.inputs, pixels, extra=state.extra)
        if config.kl_weight > 0:
            _require_logits(state.model, config, output)
        kl_rows = _counted_rows(output.logits_mask)
        rows_logits = _select_rows(output.logits.detach(), kl_rows) if output.logits is not None else None
        memory.replay = Replay(
            inputs=state.inputs,
            extra=state.extra,
            share=state.share,
            placed=state.placed,
            clean_pixels=state.pixel_values.detach(),
            delta=torch.zeros_like(state.pixel_values.detach()),
            last_pixels=pixels,
            clean_logits=rows_logits if config.kl_weight > 0 else None,
            kl_rows=kl_rows,
            remaining=config.free_replay - 1,
        )
        state.loss = output.loss if config.task_weight == 1 else config.task_weight * output.loss
        state.parts["clean"] = output.loss.detach()
        return _replay_output(state, rows_logits, kl_rows, state.inputs, pixels.detach())
    gradient = replay.last_pixels.grad
    if gradient is None:
        raise RuntimeError(
            "RANConfig.free_replay perturbs each replay with the input gradient of the previous one's backward, but "
            "the previous replay's pixels got no gradient: call `.backward()` on every step's loss."
        )
    kernel_arguments = {
        **replay.placed.kernel_arguments(),
        "epsilon": state.epsilon,
        "norm": config.attack_norm,
    }
    step_size = config.resolved_step_size * state.ramp
    replay.delta, adversarial = pgd_step(
        replay.delta, gradient, replay.clean_pixels, step_size=step_size, **kernel_arguments
    )
    replay.last_pixels = adversarial.detach().requires_grad_(True)
    replay.remaining -= 1
    output = state.family.run(state.forward, replay.inputs, replay.last_pixels, extra=replay.extra)
    state.share, state.loss = replay.share, None
    state.add(output.loss, config.task_weight)
    state.parts["adversarial"] = output.loss.detach()
    rows_logits = None
    if config.kl_weight > 0:
        adversarial_rows = _kl_rows(output, replay.kl_rows, dense_gradient=config.task_weight > 0)
        rows_logits = adversarial_rows.detach()
        kl = rectification_kl(
            replay.clean_logits,
            adversarial_rows,
            output.logits_mask if replay.kl_rows is None else None,
            temperature=config.kl_temperature,
            detach_clean=True,
        )
        state.add_part("kl", kl, config.kl_weight * state.ramp)
    state.parts["epsilon"] = torch.tensor(state.epsilon)
    if rows_logits is None and output.logits is not None:
        rows_logits = _select_rows(output.logits.detach(), replay.kl_rows)
    return _replay_output(state, rows_logits, replay.kl_rows, replay.inputs, adversarial.detach())


def _replay_output(
    state: RANStep,
    rows_logits: torch.Tensor | None,
    kl_rows: torch.Tensor | None,
    inputs: Mapping[str, Any],
    pixels: torch.Tensor,
) -> RANOutput:
    """A replay's output: `rows_logits` (its detached counted logit rows) as the logits of a model with small ones,
    as a generative VLM's counted rows with the labels they belong to otherwise."""
    return RANOutput(
        loss=state.loss,
        logits=rows_logits if kl_rows is None else None,
        parts=state.parts,
        adversarial_pixel_values=pixels,
        counted_logits=rows_logits if kl_rows is not None else None,
        labels=inputs.get("labels"),
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
        self.memory = RecipeMemory()  # carried perturbations and Free AT's replay, kept across steps
        self._original_forward = model.forward
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}  # per part: light-weight recipes log some parts on some steps only
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
                memory=self.memory,
            )
            self._record(output.parts)
            if fused:
                labels = output.labels if output.labels is not None else kwargs["labels"]
                return fused_lm_head_output(output.loss, output, labels, kwargs.get("num_items_in_batch"))
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
            self._counts[name] = self._counts.get(name, 0) + 1

    def pop_logged_parts(self) -> dict[str, float]:
        """The mean of each loss part since the last call, over the calls that gave it (and reset)."""
        if not self._counts:
            return {}
        means = {f"ran/{name}": float(total) / self._counts[name] for name, total in self._sums.items()}
        self._sums, self._counts = {}, {}
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
