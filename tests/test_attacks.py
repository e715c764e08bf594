import pytest
import tiny_models as tm
import torch
from peft import get_peft_model

from ran_peft import AttackBudget, PixelBox, RANConfig, attack_mode, detect_family, pgd_perturb

BOX = PixelBox(tm.MEAN, tm.STD)


def _objective(model, family, inputs):
    def loss(adversarial_pixels, text):
        return family.run(model, inputs, adversarial_pixels).loss

    return loss


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("steps", [1, 5])
def test_pgd_stays_in_budget_and_box_and_raises_the_loss(norm, steps):
    case = tm.vit(batch=6)
    family = detect_family(case.model)
    epsilon = 8 / 255
    budget = AttackBudget(epsilon=epsilon, step_size=2.5 * epsilon / steps, steps=steps, norm=norm)
    objective = _objective(case.model, family, case.batch)
    with attack_mode(case.model):
        adversarial = pgd_perturb(objective, case.batch["pixel_values"], BOX, budget)
        clean_loss = objective(case.batch["pixel_values"], None).item()
        adversarial_loss = objective(adversarial, None).item()

    delta_pixels = BOX.to_pixels(adversarial) - BOX.to_pixels(case.batch["pixel_values"])
    if norm == "linf":
        assert delta_pixels.abs().max().item() <= epsilon + 1e-5
    else:
        assert delta_pixels.flatten(1).norm(dim=1).max().item() <= epsilon + 1e-5
    adversarial_pixels = BOX.to_pixels(adversarial)
    assert adversarial_pixels.min().item() >= -1e-5 and adversarial_pixels.max().item() <= 1 + 1e-5
    assert adversarial_loss > clean_loss


def test_attack_keeps_no_parameter_gradient_and_restores_training_flags():
    case = tm.vit()
    model = case.model
    model.train()
    model.vit.embeddings.eval()  # a part the user froze in eval mode must stay so
    family = detect_family(model)
    seen_training = []
    model.vit.embeddings.dropout.register_forward_hook(lambda m, i, o: seen_training.append(m.training))
    with attack_mode(model):
        pgd_perturb(
            _objective(model, family, case.batch),
            case.batch["pixel_values"],
            BOX,
            AttackBudget(epsilon=4 / 255, step_size=1 / 255, steps=3),
        )
    assert seen_training == [False, False, False]  # dropout off during every attack pass
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.classifier.training and not model.vit.embeddings.training


def test_attack_is_deterministic_given_the_generator():
    case = tm.vit()
    model = case.model.train()
    family = detect_family(model)
    budget = AttackBudget(epsilon=4 / 255, step_size=1 / 255, steps=2)
    runs = []
    for _ in range(2):
        with attack_mode(model):
            runs.append(
                pgd_perturb(
                    _objective(model, family, case.batch),
                    case.batch["pixel_values"],
                    BOX,
                    budget,
                    generator=torch.Generator().manual_seed(3),
                )
            )
    assert torch.equal(runs[0], runs[1])


def test_free_start_with_one_step_needs_no_attack_forward():
    case = tm.vit()
    family = detect_family(case.model)
    calls = []

    def objective(pixels, text):
        calls.append(1)
        return family.run(case.model, case.batch, pixels).loss

    gradient = torch.randn_like(case.batch["pixel_values"])
    adversarial = pgd_perturb(
        objective,
        case.batch["pixel_values"],
        BOX,
        AttackBudget(epsilon=4 / 255, step_size=5 / 255, steps=1, random_start=False),
        first_gradient=gradient,
    )
    assert calls == []
    # one full sign step of the given gradient, clipped to the budget
    delta = BOX.to_pixels(adversarial) - BOX.to_pixels(case.batch["pixel_values"])
    inside = (BOX.to_pixels(case.batch["pixel_values"]) - 0.5).abs() < 0.45
    expected = torch.sign(gradient) * (4 / 255)
    assert torch.allclose(delta[inside], expected[inside], atol=1e-5)


def test_attack_works_on_a_bf16_model():
    case = tm.clip()
    model = get_peft_model(case.model, RANConfig(r=4, target_modules=case.target_modules)).to(torch.bfloat16)
    family = detect_family(model)
    inputs = {**case.batch, "pixel_values": case.batch["pixel_values"].to(torch.bfloat16)}
    with attack_mode(model):
        adversarial = pgd_perturb(
            _objective(model, family, inputs),
            inputs["pixel_values"],
            BOX,
            AttackBudget(epsilon=8 / 255, step_size=4 / 255, steps=2),
        )
    assert adversarial.dtype == torch.bfloat16
    delta = BOX.to_pixels(adversarial) - BOX.to_pixels(inputs["pixel_values"])
    assert delta.abs().max().item() <= 8 / 255 + 0.02  # bf16 rounding of values around 1
    assert delta.abs().max().item() > 0


def test_attack_refuses_a_loss_that_ignores_the_pixels():
    pixels = torch.zeros(2, 3, 4, 4)
    weight = torch.ones(1, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not depend on `pixel_values`"):
        pgd_perturb(lambda x, t: weight.sum(), pixels, BOX, AttackBudget(epsilon=0.1, step_size=0.1, steps=1))


def test_pixel_box_reads_processors_and_checks_channels():
    box = PixelBox.from_processor(tm.processor())
    assert box.mean == pytest.approx(tm.MEAN) and box.std == pytest.approx(tm.STD)
    assert PixelBox.from_processor(object()) is None
    with pytest.raises(ValueError, match="channels"):
        box.bounds(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="std"):
        PixelBox((0.5,), (0.0,))
