"""Adversarial examples: projected gradient ascent (PGD / FGSM) in [0, 1] pixel units, with an optional joint
perturbation of the text token embeddings. Pure functions over a loss callable, plus the model-side contexts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ran_peft.kernels import pgd_random_start, pgd_step
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
            raise ValueError(f"attack budgets must be >= 0, got epsilon={self.epsilon}, text={self.text_epsilon}.")
        if self.steps < 0:
            raise ValueError(f"attack steps must be >= 0, got {self.steps}.")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"attack norm must be 'linf' or 'l2', got {self.norm!r}.")


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
        self.track_gradient = track_gradient
        handle = self.embedding.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.track_gradient = False

    def step(self, gradient: torch.Tensor | None, step_size: float) -> None:
        if self.delta is None or gradient is None:
            return
        with torch.no_grad():
            updated = self.delta + step_size * gradient.float().sign()
            self.delta = updated.clamp_(-self.epsilon, self.epsilon)

    def detach(self) -> None:
        if self.delta is not None:
            self.delta = self.delta.detach()


def pgd_perturb(
    loss_fn: AttackLoss,
    pixel_values: torch.Tensor,
    box: PixelBox,
    budget: AttackBudget,
    *,
    first_gradient: torch.Tensor | None = None,
    text: TextPerturbation | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise `loss_fn(adversarial_pixels, text)` by projected sign-gradient ascent; return the adversarial pixels.

    - The perturbation stays in the `budget.epsilon` ball (per channel, pixel units) and the valid pixel box.
    - `first_gradient`: the loss's gradient at the clean input (free start); it makes the first step, so
      `budget.steps` counts it and one step then needs no extra forward pass.
    - Only the input (and text perturbation) gradients are computed: parameters get none.
    """
    clean = pixel_values.detach()
    std = box.std_vector(clean)
    lower, upper = box.bounds(clean)
    step_kwargs = {"std": std, "lower": lower, "upper": upper, "epsilon": budget.epsilon, "norm": budget.norm}
    if budget.random_start and budget.epsilon > 0:
        delta = pgd_random_start(clean, generator=generator, **step_kwargs)
    else:
        delta = torch.zeros_like(clean)
    adversarial = (clean + delta).to(clean.dtype)
    steps_left = budget.steps
    if first_gradient is not None and steps_left > 0:
        delta, adversarial = pgd_step(delta, first_gradient, clean, step_size=budget.step_size, **step_kwargs)
        steps_left -= 1
    for _ in range(steps_left):
        variable = adversarial.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(variable, text)
            targets = [variable]
            text_delta = text.delta if text is not None else None
            if text_delta is not None and text_delta.requires_grad:
                targets.append(text_delta)
            gradients = torch.autograd.grad(loss, targets, allow_unused=True)
        if gradients[0] is None:
            raise RuntimeError(
                "the attack loss does not depend on `pixel_values`: the model ignored the perturbed pixels."
            )
        if not torch.isfinite(gradients[0]).all():
            raise FloatingPointError(
                "the attack gradient holds NaN or inf (fp16 overflow?): the attack step was not taken. "
                "Train in bf16 or fp32, or lower the loss scale."
            )
        delta, adversarial = pgd_step(delta, gradients[0], clean, step_size=budget.step_size, **step_kwargs)
        if text is not None and len(gradients) > 1:
            text.step(gradients[1], budget.text_step_size)
    if text is not None:
        text.detach()
    return adversarial.detach()


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Dropout and other train-time randomness off, and no parameter gradient kept, for the attack's passes.

    Every module's own `training` flag is restored afterwards (frozen parts kept in eval stay so).
    """
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in was_training:
            module.training = training
