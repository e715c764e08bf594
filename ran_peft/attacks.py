"""Adversarial examples: projected gradient ascent (PGD / FGSM) in [0, 1] pixel units, with an optional joint
perturbation of the text token embeddings. Pure functions over a loss callable, plus the model-side contexts.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ran_peft.kernels.pgd import pgd_random_start, pgd_step
from ran_peft.pixel_layout import BatchPixelBox, ChannelsFirstLayout
from ran_peft.pixels import PixelBox

AttackLoss = Callable[[torch.Tensor, "TextPerturbation | None"], torch.Tensor]


@dataclass
class AttackBudget:
    """Budgets of one attack. `epsilon` and `step_size` are in [0, 1] pixel units; text ones in embedding units."""

    epsilon: float
    step_size: float
    steps: int = 1
    norm: str = "linf"
    random_start: bool = True
    text_epsilon: float = 0.0
    text_step_size: float = 0.0

    def __post_init__(self) -> None:
        if self.epsilon < 0 or self.text_epsilon < 0:
            raise ValueError(
                f"attack budgets must be >= 0, got epsilon={self.epsilon}, text={self.text_epsilon}."
            )
        if self.steps < 0:
            raise ValueError(f"attack steps must be >= 0, got {self.steps}.")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"attack norm must be 'linf' or 'l2', got {self.norm!r}.")


class AttackSkippedWarning(RuntimeWarning):
    """An attack stopped early on a non-finite gradient (fp16 overflow); the batch trains on the last finite step."""


@dataclass
class AttackReport:
    """What one `pgd_perturb` call did: the sign steps it took and whether a non-finite gradient cut it short."""

    steps_taken: int = 0
    skipped: bool = False
    pixel_gradient_zero: bool = False  # the first input gradient was exactly 0: the output ignores the pixels


_REENTRANT_CHECKPOINT_MARKERS = ("use_reentrant", "Checkpointing is not compatible")


def input_gradients(
    loss: torch.Tensor, targets: Sequence[torch.Tensor], **kwargs
) -> tuple[torch.Tensor | None, ...]:
    """`torch.autograd.grad(loss, targets)`, with a clear error for reentrant activation checkpointing.

    RAN needs gradients with respect to the input pixels without touching `.grad` (so that DDP's reducer and the
    optimiser never see the attack's gradients); reentrant checkpointing only supports a plain `.backward()`.
    """
    try:
        return torch.autograd.grad(loss, list(targets), **kwargs)
    except RuntimeError as error:
        if any(marker in str(error) for marker in _REENTRANT_CHECKPOINT_MARKERS):
            raise RuntimeError(
                "RAN takes input gradients with torch.autograd.grad, which reentrant activation checkpointing "
                "does not support. Use non-reentrant checkpointing (transformers' default): pass "
                '`activation_checkpointing_kwargs={"use_reentrant": False}` to TrainingArguments '
                "(`gradient_checkpointing_kwargs` before transformers 5), or the same to the model's "
                "`gradient_checkpointing_enable`."
            ) from error
        raise


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    return all(tensor is None or bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _keeps_collectives_in_step() -> bool:
    """Under torch.distributed every rank must run the same passes: a sharded model (FSDP, ZeRO-3) gathers its
    parameters across ranks in every forward, so one rank skipping passes would leave the others waiting."""
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1


class TextPerturbation:
    """An additive perturbation of a token-embedding module's output, applied through a forward hook.

    The perturbation takes the shape of the embedding output on first use, so it fits whatever text the forward
    pass embeds (captions, prompts or class prompts).
    """

    def __init__(self, embedding: nn.Module, epsilon: float):
        self.embedding = embedding
        self.epsilon = epsilon
        self.delta: torch.Tensor | None = None
        self.track_gradient = False

    def _hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if self.delta is None or self.delta.shape != output.shape:
            self.delta = torch.zeros_like(output, dtype=torch.float32)
        if self.track_gradient and not self.delta.requires_grad:
            self.delta.requires_grad_(True)
        return output + self.delta.to(output.dtype)

    @contextlib.contextmanager
    def active(self, track_gradient: bool = False) -> Iterator[TextPerturbation]:
        """Add the perturbation to the embedding's output inside the `with` block (its gradient tracked when
        `track_gradient`); the hook is removed on leaving."""
        self.track_gradient = track_gradient
        handle = self.embedding.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.track_gradient = False

    def step(self, gradient: torch.Tensor | None, step_size: float) -> None:
        """One signed-gradient ascent step of `step_size`, projected on the L-inf ball of `epsilon`; a missing or
        non-finite gradient leaves the perturbation as it is."""
        if self.delta is None or gradient is None or not _all_finite(gradient):
            return  # a non-finite gradient (fp16 overflow) moves nothing: the sign of NaN is NaN
        with torch.no_grad():
            updated = self.delta + step_size * gradient.float().sign()
            self.delta = updated.clamp_(-self.epsilon, self.epsilon)

    def detach(self) -> None:
        """Cut the perturbation from the graph it was made in (keep its value, drop its history)."""
        if self.delta is not None:
            self.delta = self.delta.detach()


def pgd_perturb(
    loss_fn: AttackLoss,
    pixel_values: torch.Tensor,
    box: PixelBox | BatchPixelBox,
    budget: AttackBudget,
    *,
    first_gradient: torch.Tensor | None = None,
    text: TextPerturbation | None = None,
    generator: torch.Generator | None = None,
    report: AttackReport | None = None,
    start: torch.Tensor | None = None,
    start_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise `loss_fn(adversarial_pixels, text)` by projected sign-gradient ascent; return the adversarial pixels.

    - The perturbation stays in the `budget.epsilon` ball (per channel, pixel units) and the valid pixel box.
      `box` is the batch's placed box (`BatchPixelBox.place(box, batch)`: channels and padding where the batch's
      layout puts them; padding never moves); a bare `PixelBox` means channel-first `(..., C, H, W)` images.
    - `first_gradient`: the loss's gradient at the clean input (free start); it makes the first step, so
      `budget.steps` counts it and one step then needs no extra forward pass.
    - Only the input (and text perturbation) gradients are computed: parameters get none.
    - `start`: a perturbation (model units, shaped like `pixel_values`) to start from instead of the random start,
      projected into the budget; with `start_rows` (bool, one per sample on the first axis) only those samples
      start from it (carried perturbations).
    - A non-finite gradient (fp16 overflow) ends the attack: the last finite perturbation is kept, an
      `AttackSkippedWarning` is issued and `report.skipped` is set. Under torch.distributed the remaining passes
      still run (their gradients unused), so that every rank runs the same passes.
    """
    report = report if report is not None else AttackReport()
    clean = pixel_values.detach()
    if isinstance(box, PixelBox):
        box = BatchPixelBox.place(box, {"pixel_values": clean}, ChannelsFirstLayout())
    if budget.norm == "l2" and box.placement.sample_ndim is None:
        raise ValueError(
            f"attack_norm='l2' needs each sample to be a fixed block of dims, but {box.placement.layout} pixels of "
            f"shape {tuple(clean.shape)} hold images of different sizes: use attack_norm='linf'."
        )
    step_kwargs = {**box.kernel_arguments(), "epsilon": budget.epsilon, "norm": budget.norm}
    first_seen = False

    def note_first_gradient(gradient: torch.Tensor) -> None:
        nonlocal first_seen
        if not first_seen:
            first_seen = True
            report.pixel_gradient_zero = not bool(gradient.any())

    if budget.random_start and budget.epsilon > 0:
        delta = pgd_random_start(clean, generator=generator, **step_kwargs)
    else:
        delta = torch.zeros_like(clean)
    if start is not None:
        # A zero step is the projection alone: the start may come from a larger budget (before a warm-up ended).
        carried, _ = pgd_step(
            start.to(clean.dtype), torch.zeros_like(clean), clean, step_size=0.0, **step_kwargs
        )
        if start_rows is None:
            delta = carried
        else:
            rows = start_rows.reshape(-1, *([1] * (clean.dim() - 1))).to(clean.device)
            delta = torch.where(rows, carried, delta)
    adversarial = (clean + delta).to(clean.dtype)
    steps_left = budget.steps
    if first_gradient is not None and steps_left > 0:
        steps_left -= 1
        note_first_gradient(first_gradient)
        if _all_finite(first_gradient):
            delta, adversarial = pgd_step(
                delta, first_gradient, clean, step_size=budget.step_size, **step_kwargs
            )
            report.steps_taken += 1
        else:
            _skip(report, "the clean pass's input gradient (free start)")
    if report.skipped and not _keeps_collectives_in_step():
        steps_left = 0
    for _ in range(steps_left):
        variable = adversarial.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(variable, text)
            targets = [variable]
            text_delta = text.delta if text is not None else None
            if text_delta is not None and text_delta.requires_grad:
                targets.append(text_delta)
            gradients = input_gradients(loss, targets, allow_unused=True)
        if gradients[0] is None:
            raise RuntimeError(
                "the attack loss does not depend on `pixel_values`: the model ignored the perturbed pixels."
            )
        note_first_gradient(gradients[0])
        if report.skipped:
            continue  # only here to keep the ranks' passes in step
        if not _all_finite(*gradients):
            _skip(report, f"attack step {report.steps_taken + 1}")
            if _keeps_collectives_in_step():
                continue
            break
        delta, adversarial = pgd_step(delta, gradients[0], clean, step_size=budget.step_size, **step_kwargs)
        report.steps_taken += 1
        if text is not None and len(gradients) > 1:
            text.step(gradients[1], budget.text_step_size)
    if text is not None:
        text.detach()
    return adversarial.detach()


def _skip(report: AttackReport, where: str) -> None:
    report.skipped = True
    warnings.warn(
        AttackSkippedWarning(
            f"the attack gradient of {where} holds NaN or inf (fp16 overflow?): the rest of this batch's attack is "
            f"skipped and the last finite perturbation ({report.steps_taken} step(s)) is used. The count is logged "
            "as `ran/attack_skipped`; if it is frequent, train in bf16 or fp32."
        ),
        stacklevel=3,
    )


# Attribute names under which modules keep a probability of a train-time random choice, for the layers that apply
# it themselves when `self.training` (attention dropout inside `scaled_dot_product_attention`, LayerDrop, drop-path,
# router jitter) rather than through an `nn.Dropout` child.
_STOCHASTIC_ATTRIBUTE_MARKERS = ("drop", "jitter")
_STOCHASTIC_CLASS_MARKERS = ("dropout", "droppath", "stochasticdepth")


def is_stochastic_layer(module: nn.Module) -> bool:
    """Whether `module` draws randomness in training mode: dropout-like layers, and layers holding a positive
    drop/jitter probability that they apply themselves."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    if any(marker in type(module).__name__.lower() for marker in _STOCHASTIC_CLASS_MARKERS):
        return True
    return any(
        isinstance(value, float)
        and value > 0
        and any(marker in name.lower() for marker in _STOCHASTIC_ATTRIBUTE_MARKERS)
        for name, value in vars(module).items()
    )


def has_running_statistics(module: nn.Module) -> bool:
    """Whether `module` normalises with batch statistics in training and keeps running ones (BatchNorm & co)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.track_running_stats
    return isinstance(getattr(module, "running_mean", None), torch.Tensor)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """The deterministic model for the attack's passes: stochastic layers off and normalisation statistics neither
    taken from the batch nor updated (running statistics used).

    Only those layers are switched, one module at a time (never `model.eval()`): every other module keeps its mode,
    because some library layers change more than their randomness in eval (bitsandbytes' 4-bit linear, on a CPU
    with AVX512-BF16, repacks its weight in place for inference when it sees eval mode and an input without
    gradient, and the next training pass would read the packed weight as the plain one). Flags are restored after.
    """
    switched = [
        module
        for module in model.modules()
        if module.training and (is_stochastic_layer(module) or has_running_statistics(module))
    ]
    for module in switched:
        module.training = False
    try:
        yield
    finally:
        for module in switched:
            module.training = True


@contextlib.contextmanager
def running_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm-style layers in training mode normalise with the batch's own statistics but fold nothing into
    their running statistics (nor count the batch); restored afterwards."""
    frozen = [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
    ]
    for module in frozen:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in frozen:
            module.track_running_stats = True


@contextlib.contextmanager
def deterministic_training_mode(model: nn.Module) -> Iterator[None]:
    """Training mode for every module, then `attack_mode`'s switches: for attacks on a model that is in eval mode
    (evaluation, noise crafting).

    An attack needs input gradients through every layer, and some library layers take an inference-only path in
    eval mode that carries none (bitsandbytes' packed 4-bit CPU weights). Training mode minus randomness and batch
    statistics is the same function without that path. Every module's flag is restored afterwards.
    """
    was_training = [(module, module.training) for module in model.modules()]
    for module, _ in was_training:
        module.training = True
    try:
        with attack_mode(model):
            yield
    finally:
        for module, training in was_training:
            module.training = training
