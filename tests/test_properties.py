"""Property-based tests: every valid `RANConfig` constructs, every invalid one names its field, and PGD never
leaves its budget or the pixel box, whatever the budget, normalisation and image shape."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ran_peft import AttackBudget, PixelBox, RANConfig, pgd_perturb

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_unit = st.floats(0.0, 1.0, allow_nan=False)
non_negative = st.floats(0.0, 1e3, allow_nan=False)


@SETTINGS
@given(
    epsilon=finite_unit,
    step_size=st.none() | finite_unit,
    attack_steps=st.integers(1, 20),
    attack_norm=st.sampled_from(["linf", "l2"]),
    random_start=st.booleans(),
    free_start=st.booleans(),
    attack_loss=st.sampled_from(["task", "kl"]),
    adversarial_weight=finite_unit,
    kl_weight=non_negative,
    kl_temperature=st.floats(1e-3, 100.0),
    consistency_weight=non_negative,
    spectrum_top_k=st.integers(1, 64),
    noise_warmup_steps=st.integers(0, 10_000),
    text_epsilon=non_negative,
)
def test_valid_recipes_construct_and_round_trip(**recipe):
    config = RANConfig(r=4, target_modules=["q_proj"], **recipe)
    assert config.recipe_dict().items() >= recipe.items()
    assert 0.0 <= config.resolved_step_size <= 2.5
    assert 0.0 < config.ramp(0) <= 1.0 and config.ramp(recipe["noise_warmup_steps"]) == 1.0


INVALID = {
    "epsilon": st.floats(allow_nan=True).filter(lambda v: not 0 <= v <= 1) | st.just(True) | st.just("4/255"),
    "step_size": st.floats(allow_nan=True).filter(lambda v: not 0 <= v <= 1),
    "attack_steps": st.integers(max_value=0) | st.floats(1, 5) | st.just(True),
    "attack_norm": st.text().filter(lambda v: v not in ("linf", "l2")),
    "attack_loss": st.text().filter(lambda v: v not in ("task", "kl")),
    "random_start": st.integers() | st.none(),
    "adversarial_weight": st.floats(allow_nan=True).filter(lambda v: not 0 <= v <= 1),
    "kl_weight": st.floats(max_value=-1e-9) | st.just(math.inf) | st.just(math.nan),
    "kl_temperature": st.floats(max_value=0.0) | st.just(math.nan),
    "spectrum_top_k": st.integers(max_value=0),
    "noise_warmup_steps": st.integers(max_value=-1) | st.just(2.5),
    "image_std": st.lists(st.floats(max_value=0.0), min_size=1, max_size=3),
}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(INVALID)))
def test_invalid_values_raise_a_value_error_naming_the_field(data, name):
    value = data.draw(INVALID[name], label=name)
    extra = {"image_mean": [0.5] * len(value)} if name == "image_std" else {}
    with pytest.raises(ValueError, match=rf"RANConfig\.{name}="):
        RANConfig(r=4, target_modules=["q_proj"], **{name: value}, **extra)


channel_stats = st.tuples(st.floats(0.0, 1.0), st.floats(0.05, 2.0))


@SETTINGS
@given(
    epsilon=st.floats(0.0, 0.5),
    step_ratio=st.floats(0.0, 3.0),
    steps=st.integers(0, 4),
    norm=st.sampled_from(["linf", "l2"]),
    random_start=st.booleans(),
    stats=st.lists(channel_stats, min_size=1, max_size=3),
    batch=st.integers(1, 3),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    free=st.booleans(),
)
def test_pgd_never_leaves_the_budget_or_the_pixel_box(
    epsilon, step_ratio, steps, norm, random_start, stats, batch, height, width, seed, free
):
    generator = torch.Generator().manual_seed(seed)
    box = PixelBox(tuple(m for m, _ in stats), tuple(s for _, s in stats))
    channels = len(stats)
    clean_pixels = torch.rand(batch, channels, height, width, generator=generator)
    clean = box.from_pixels(clean_pixels)
    weights = torch.randn(clean.shape, generator=generator)

    def loss(pixels, text):  # a smooth loss with gradients of every sign
        return (pixels * weights).sin().sum() + (pixels**2).sum()

    budget = AttackBudget(epsilon=epsilon, step_size=step_ratio * epsilon, steps=steps, norm=norm,
                          random_start=random_start)  # fmt: skip
    first = torch.randn(clean.shape, generator=generator) if free else None
    adversarial = pgd_perturb(loss, clean, box, budget, first_gradient=first, generator=generator)

    delta = box.to_pixels(adversarial) - clean_pixels
    slack = 1e-5
    if norm == "linf":
        assert delta.abs().max().item() <= epsilon + slack
    else:
        assert delta.flatten(1).norm(dim=1).max().item() <= epsilon + slack
    pixels = box.to_pixels(adversarial)
    assert pixels.min().item() >= -slack and pixels.max().item() <= 1 + slack
    assert torch.isfinite(adversarial).all()
