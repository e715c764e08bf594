"""Inputs that would make RAN train on garbage fail loudly, or have a documented safe behaviour."""

import pytest
import tiny_models as tm
import torch
from peft import get_peft_model

from ran_peft import AttackBudget, PixelBox, RANConfig, detect_family, pgd_perturb, ran_loss
from ran_peft.attacks import AttackReport, AttackSkippedWarning

BOX = PixelBox(tm.MEAN, tm.STD)


def _model(case, **recipe):
    config = RANConfig(
        r=4, target_modules=case.target_modules, modules_to_save=case.modules_to_save, **recipe
    )
    return get_peft_model(case.model, config).train(), config


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_pixels_are_refused(bad):
    case = tm.vit()
    model, config = _model(case)
    pixels = case.batch["pixel_values"].clone()
    pixels[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        ran_loss(model, {**case.batch, "pixel_values": pixels}, config, pixel_box=BOX)


@pytest.mark.parametrize(
    "make_pixels, box",
    [
        (lambda raw: raw * 255, BOX),  # raw 0-255 pixels, never rescaled or normalised
        (lambda raw: (raw - 0.5) / 0.5, PixelBox()),  # normalised pixels, but a do_normalize=False processor
        (lambda raw: (raw - 0.5) / 0.05, BOX),  # another processor's much smaller std
    ],
)
def test_pixels_outside_the_processors_range_name_the_normalisation(make_pixels, box):
    case = tm.vit()
    model, config = _model(case)
    raw = torch.rand(4, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"normalisation \(mean/std\) does not match these pixels") as error:
        ran_loss(model, {**case.batch, "pixel_values": make_pixels(raw)}, config, pixel_box=box)
    message = str(error.value)
    assert "span [" in message and "maps [0, 1] pixels to [" in message and str(list(box.std)) in message


def test_pixels_a_resize_filter_overshot_slightly_are_accepted():
    case = tm.vit()
    model, config = _model(case)
    pixels = BOX.from_pixels(torch.rand(4, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE) * 1.1 - 0.05)  # [-0.05, 1.05]
    output = ran_loss(model, {**case.batch, "pixel_values": pixels}, config, pixel_box=BOX)
    assert torch.isfinite(output.loss)


def test_imagenet_pixels_read_with_clip_statistics_are_caught_but_the_reverse_cannot_be_seen():
    case = tm.vit()
    model, config = _model(case)
    imagenet = PixelBox((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    raw = torch.rand(4, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with pytest.raises(
        ValueError, match="does not match these pixels"
    ):  # ImageNet's wider range leaves CLIP's box
        ran_loss(model, {**case.batch, "pixel_values": imagenet.from_pixels(raw)}, config, pixel_box=BOX)
    # Documented limit: CLIP-normalised pixels read with ImageNet's mean/std stay inside ImageNet's box.
    output = ran_loss(model, {**case.batch, "pixel_values": BOX.from_pixels(raw)}, config, pixel_box=imagenet)
    assert torch.isfinite(output.loss)


def test_empty_batch_is_refused():
    case = tm.vit()
    model, config = _model(case)
    empty = {"pixel_values": torch.zeros(0, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE), "labels": torch.zeros(0).long()}
    with pytest.raises(ValueError, match="empty batch"):
        ran_loss(model, empty, config, pixel_box=BOX)


@pytest.mark.parametrize("name, message", [("vit", "needs `labels`"), ("llava", "needs `labels`")])
def test_batch_without_labels_is_refused_where_the_task_needs_them(name, message):
    case = tm.ALL_CASES[name]()
    model, config = _model(case)
    batch = {key: value for key, value in case.batch.items() if key != "labels"}
    with pytest.raises(ValueError, match=message):
        ran_loss(model, batch, config, pixel_box=BOX)


def test_dual_encoder_without_labels_trains_contrastively():
    case = tm.clip()
    model, config = _model(case)
    assert "labels" not in case.batch
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    assert torch.isfinite(output.loss)


class _BlowUpGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies by 1e6, which overflows float16 (max 65504) but not float32."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, gradient):
        return gradient * 1e6


def _overflowing_loss(calls_before_overflow):
    calls = []

    def loss(pixels, text):
        calls.append(1)
        pixels = pixels if len(calls) <= calls_before_overflow else _BlowUpGradient.apply(pixels)
        return (pixels.float().tanh() * torch.linspace(-1, 1, pixels[0].numel()).view(pixels[0].shape)).sum()

    return loss


def test_fp16_gradient_overflow_keeps_the_last_finite_step_and_reports_it():
    pixels = tm.pixels(2, torch.Generator().manual_seed(0)).half()
    budget = AttackBudget(epsilon=8 / 255, step_size=2 / 255, steps=4, random_start=False)
    one_step = pgd_perturb(
        _overflowing_loss(99), pixels, BOX, AttackBudget(**{**budget.__dict__, "steps": 1})
    )
    report = AttackReport()
    with pytest.warns(AttackSkippedWarning, match="last finite perturbation \\(1 step"):
        adversarial = pgd_perturb(_overflowing_loss(1), pixels, BOX, budget, report=report)
    assert report.skipped and report.steps_taken == 1
    assert torch.equal(adversarial, one_step)  # the step before the overflow, not a NaN
    assert torch.isfinite(adversarial).all()


def test_fp16_overflow_in_ran_loss_is_counted_in_the_parts():
    case = tm.convnext()
    model, config = _model(case, attack_steps=3)
    model = model.half()
    model.base_model.model.classifier.modules_to_save["default"].register_forward_pre_hook(
        lambda module, args: (_BlowUpGradient.apply(args[0]),)
    )
    batch = {**case.batch, "pixel_values": case.batch["pixel_values"].half()}
    with pytest.warns(AttackSkippedWarning):
        output = ran_loss(model, batch, config, pixel_box=BOX)
    assert output.parts["attack_skipped"] == 1.0
    assert torch.isfinite(output.adversarial_pixel_values).all()
    delta = BOX.to_pixels(output.adversarial_pixel_values) - BOX.to_pixels(batch["pixel_values"])
    assert delta.abs().max() <= config.epsilon + 2e-3  # fp16 rounding


def test_attack_without_overflow_reports_no_skip():
    case = tm.vit()
    model, config = _model(case)
    output = ran_loss(model, case.batch, config, pixel_box=BOX)
    assert output.parts["attack_skipped"] == 0.0
    assert detect_family(model).name == "image_classifier"
