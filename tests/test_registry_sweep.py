"""Every family transformers' auto mappings list for image-text-to-text, zero-shot image classification and image
classification, in the installed version, through the stock Trainer with RAN.

For each family that can be built tiny here (`registry_models.build_tiny`), two steps of RAN's defaults; then, from
two solid grey images put through the family's own image processor (no layout knowledge): every element that is the
same for both greys is padding and must stay bit-identical, and every other element's pixel-unit scale is the grey
step over its change, so on real elements the perturbation is exactly epsilon (1e-6) and the adversarial pixels stay
in [0, 1]. Stock PEFT reloads the adapter with identical outputs. A family RAN refuses must get a named error that
says what to state. Every outcome is recorded; with `RAN_MODELS_OUTCOMES=path` they are written there as JSON, which
`docs/gen_models_table.py` turns into `docs/models.md` and the README's table.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import registry_models as registry
import torch
import transformers
from peft import PeftModel
from trainer_harness import output_tensor, train_two_steps

from ran_peft import PixelIndependentWarning, PixelLayoutError, RANConfig, UnsupportedModelError

FAMILIES = registry.registry_families()
OUTCOMES_ENV = "RAN_MODELS_OUTCOMES"

TRAINED = "trained, exact budget"
NAMED_ERROR = "named error"
NOT_BUILDABLE = "not buildable here"
FAILED = "failed"


@pytest.fixture(scope="module")
def outcomes():
    """The outcome of every family tried in this session; written to $RAN_MODELS_OUTCOMES at the end."""
    found: dict[str, dict] = {}
    started = time.perf_counter()
    yield found
    gc.unfreeze()  # each test froze what it found (see below): the rest of the session may collect it again
    gc.collect()
    path = os.environ.get(OUTCOMES_ENV)
    if path:
        rows = [found[family.id] for family in FAMILIES if family.id in found]
        result = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "mappings": list(registry.MAPPINGS),
            "registry": [[family.mapping, family.model_type, family.head_class] for family in FAMILIES],
            "seconds": round(time.perf_counter() - started, 1),
            "families": rows,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")


def _row(family: registry.RegistryFamily, outcome: str, **fields) -> dict:
    head = getattr(transformers, family.head_class, None)
    takes_video = head is not None and "pixel_values_videos" in inspect.signature(head.forward).parameters
    return {"mapping": family.mapping, "model_type": family.model_type, "head_class": family.head_class,
            "outcome": outcome, "takes_video": takes_video, **fields}  # fmt: skip


@dataclass
class ProbedPixels:
    """What the family's own processor says about every element of the batch's `pixel_values`, from solid images.

    `padding`: the same for both greys (no image content reaches it). `units`: [0, 1] pixel units per model unit
    (the grey step over the element's change), 0 on padding; `low`: the element's value at the low grey, so that
    pixel = low grey + (value - low) * units. `blended`: elements that change less than the other elements of their
    channel (found from the one-channel probes): the processor mixed image with its own padding there (resampling
    across a padded edge), so their units are not the image's; they are checked against the ball in their channel's
    units, and left out of the exactness and range checks.
    """

    padding: torch.Tensor
    units: torch.Tensor
    low: torch.Tensor
    blended: torch.Tensor
    channel_units: torch.Tensor  # the pure-image units of each element's channel


def probe_pixels(tiny: registry.TinyFamily) -> ProbedPixels:
    low, high, *raised = (probe["pixel_values"].double() for probe in tiny.probes)
    assert low.shape == tiny.batch["pixel_values"].shape == high.shape, (
        "the probes must have the batch's layout"
    )
    padding = low == high
    step = (registry.GREY_HIGH - registry.GREY_LOW) / 255
    change = torch.where(padding, torch.ones_like(low), high - low)
    units = torch.where(padding, torch.zeros_like(low), step / change)
    channel = torch.stack([(probe - low).abs() for probe in raised]).argmax(0)
    slope = (high - low).abs()
    full = torch.zeros_like(low)
    for index in range(len(raised)):
        members = (channel == index) & ~padding
        if members.any():
            full = torch.where(members, slope[members].max(), full)
    blended = ~padding & (slope < full * (1 - 1e-4))
    channel_units = torch.where(
        padding, torch.zeros_like(low), step / torch.where(padding, torch.ones_like(full), full)
    )
    return ProbedPixels(padding, units, low, blended, channel_units)


def _what_to_state(error: Exception) -> bool:
    """Whether a refusal says what to state or change: a setting, an input, or the families RAN supports."""
    hints = ("pixel_layout", "RANConfig", "RAN supports", "pass ", "set ", "State ", "rename")
    return any(hint in str(error) for hint in hints)


def _named_error(error: Exception) -> bool:
    return isinstance(error, (PixelLayoutError, UnsupportedModelError)) or (
        type(error) is ValueError and "`" in str(error)
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES, ids=[family.id for family in FAMILIES])
def test_every_registry_family_trains_with_the_exact_budget_or_says_what_to_state(
    family, outcomes, tmp_path, monkeypatch
):
    gc.collect()
    # The Trainer collects garbage at the end of training (accelerate's `free_memory`): with every family's modules
    # imported that scan took 0.5 s per family (measured with transformers alone imported; it grows as family
    # modules pile up); frozen objects are not scanned again.
    gc.freeze()
    try:
        tiny = registry.build_tiny(family)
    except registry.NotBuildable as error:
        outcomes[family.id] = _row(family, NOT_BUILDABLE, reason=error.reason, detail=error.detail)
        pytest.skip(f"not buildable here: {error}")
    image_processor = type(tiny.image_processor).__name__
    base_twin = copy.deepcopy(tiny.model)
    config = RANConfig(
        r=4, target_modules=tiny.target_modules, modules_to_save=tiny.modules_to_save, **tiny.recipe
    )
    outcomes[family.id] = _row(family, FAILED, image_processor=image_processor, detail="raised")
    try:
        model, trainer, attacks = train_two_steps(
            tiny.model, tiny.batch, tiny.image_processor, config, str(tmp_path), monkeypatch,
            label_names=tiny.label_names, pixel_independent="error",
        )  # fmt: skip
    except (PixelLayoutError, UnsupportedModelError, ValueError) as error:
        if not _named_error(error):
            raise
        outcomes[family.id] = _row(
            family,
            NAMED_ERROR,
            image_processor=image_processor,
            error=type(error).__name__,
            detail=str(error),
        )
        assert _what_to_state(error), f"{type(error).__name__} does not say what to state: {error}"
        return
    except PixelIndependentWarning as warning:
        raise AssertionError(f"the tiny {family.model_type} ignores its pixels: {warning}") from warning

    probed = probe_pixels(tiny)
    padding, real = probed.padding, ~probed.padding & ~probed.blended
    assert len(attacks) == 2
    layouts = set()
    for attack in attacks:
        layouts.add(attack.box.placement.layout)
        assert attack.epsilon == config.epsilon
        moved = attack.adversarial.double() - attack.clean.double()
        padding_moved = int((moved[padding] != 0).sum())
        assert padding_moved == 0, f"{padding_moved} padding elements moved"
        size = (moved * probed.units).abs()[real].max().item()
        assert size == pytest.approx(config.epsilon, abs=1e-6), f"budget {size} instead of {config.epsilon}"
        if probed.blended.any():
            mixed = (moved * probed.channel_units).abs()[probed.blended].max().item()
            assert mixed <= config.epsilon + 1e-6, f"budget {mixed} on elements mixed with padding"
        pixels = (registry.GREY_LOW / 255 + (attack.adversarial.double() - probed.low) * probed.units)[real]
        assert pixels.min().item() >= -1e-6 and pixels.max().item() <= 1 + 1e-6, "pixels left [0, 1]"
    logged = [entry for entry in trainer.state.log_history if "ran/clean" in entry]
    assert len(logged) == 2

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_twin, tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(output_tensor(model(**tiny.batch)), output_tensor(reloaded(**tiny.batch)))
    outcomes[family.id] = _row(
        family,
        TRAINED,
        image_processor=image_processor,
        pixel_layout=" / ".join(sorted(layouts)),
        padding_elements=int(padding.sum()),
        mixed_elements=int(probed.blended.sum()),
        parameters=tiny.parameters,
    )
