import json
import warnings

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from ran_peft import AttackBudget, PixelBox, detect_family
from ran_peft.evaluation import (
    GradientMaskingWarning,
    _attack_batch,
    _correctness,
    clean_accuracy,
    evaluate_robustness,
    format_epsilon,
    gradient_masking_checks,
    parse_epsilon,
    prediction_correctness,
)
from ran_peft.families import FamilyOutput
from ran_peft.representation import (
    image_features,
    linear_probe_accuracy,
    retrieval_recall_at_k,
    zero_shot_accuracy,
)

BOX = PixelBox(tm.MEAN, tm.STD)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the models are tiny: on a shared 2-core machine, intra-op threads cost far more than they save
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _self_labelled(case):
    """The case's batch relabelled with the model's own clean predictions: clean accuracy 1, so attacks have
    something to break."""
    model = case.model.eval()
    with torch.no_grad():
        logits = model(pixel_values=case.batch["pixel_values"]).logits
    return {**case.batch, "labels": logits.argmax(-1)}


@pytest.fixture(scope="module")
def vit_case():
    case = tm.vit(batch=8)
    # A head with unit-variance weights: the predictions then depend on the pixels whatever initialisation the
    # installed transformers gives the tiny ViT (some give one class to every image, with a margin no attack moves).
    with torch.no_grad():
        torch.nn.init.normal_(
            case.model.classifier.weight, std=1.0, generator=torch.Generator().manual_seed(0)
        )
    case.batch = _self_labelled(case)
    return case


@pytest.fixture
def no_masking_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        yield


def test_epsilon_keys():
    assert [format_epsilon(e) for e in (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)] == [
        "0",
        "1/255",
        "2/255",
        "4/255",
        "8/255",
    ]
    assert format_epsilon(0.1) == "0.1"
    assert parse_epsilon("4/255") == pytest.approx(4 / 255) and parse_epsilon("0.1") == 0.1
    with pytest.raises(ValueError, match="epsilon"):
        parse_epsilon(-1 / 255)


def test_robust_accuracy_is_below_clean_and_epsilon_zero_is_clean(vit_case, no_masking_warning):
    report = evaluate_robustness(
        vit_case.model, [vit_case.batch], pixel_box=BOX, epsilons=(4 / 255, 0, 1 / 255, 16 / 255), steps=4
    )
    assert list(report.robust_accuracy) == ["0", "1/255", "4/255", "16/255"]
    assert report.clean_accuracy == 1.0 == clean_accuracy(vit_case.model, [vit_case.batch])
    assert report.robust_accuracy["0"] == report.clean_accuracy
    assert all(value <= report.clean_accuracy for value in report.robust_accuracy.values())
    assert report.robust_accuracy["16/255"] < 1.0  # the attack breaks an untrained model
    assert report.num_samples == 8
    assert report.passed_checks and report.checks["epsilon_zero_equals_clean"]["mismatched_samples"] == 0
    assert report.checks["more_steps_not_weaker"]["weaker_steps"] == 2
    assert report.attack == {
        "name": "pgd",
        "steps": 4,
        "restarts": 1,
        "step_size": "2.5*epsilon/steps",
        "norm": "linf",
        "random_start": True,
        "loss": "image_classifier task loss",
        "seed": 0,
    }
    assert json.loads(json.dumps(report.to_dict()))["robust_accuracy"] == report.robust_accuracy
    table = report.markdown_table()
    assert "| clean | 100.00% |" in table and "| 1/255 |" in table and "checks: passed" in table


def test_fgsm_runs_and_breaks_the_model(vit_case, no_masking_warning):
    report = evaluate_robustness(
        vit_case.model, [vit_case.batch], pixel_box=BOX, epsilons=(16 / 255,), attack="fgsm"
    )
    assert (
        report.attack["name"] == "fgsm" and report.attack["steps"] == 1 and not report.attack["random_start"]
    )
    assert report.robust_accuracy["16/255"] < report.clean_accuracy
    assert report.checks["more_steps_not_weaker"]["passed"] is None  # one step: nothing to compare
    with pytest.raises(ValueError, match="restarts"):
        evaluate_robustness(vit_case.model, [vit_case.batch], pixel_box=BOX, attack="fgsm", restarts=2)


def test_restarts_never_raise_robust_accuracy():
    # a one-step PGD on a convolutional model: its random start matters, so restarts change the outcome
    case = tm.convnext(batch=32)
    batch = _self_labelled(case)
    kwargs = dict(pixel_box=BOX, epsilons=(2 / 255, 3 / 255, 8 / 255), steps=1, seed=0, check_steps=False)
    one = evaluate_robustness(case.model, [batch], restarts=1, **kwargs)
    four = evaluate_robustness(case.model, [batch], restarts=4, **kwargs)
    assert four.attack["restarts"] == 4
    assert all(four.robust_accuracy[key] <= value for key, value in one.robust_accuracy.items())
    assert four.robust_accuracy != one.robust_accuracy  # the extra restarts fooled more samples


def test_worst_case_examples_fool_exactly_the_non_robust_samples(vit_case):
    model, batch = vit_case.model.eval(), vit_case.batch
    family = detect_family(model)
    budget = AttackBudget(epsilon=2 / 255, step_size=1 / 255, steps=2)
    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    survived, worst = _attack_batch(model, family, batch, BOX, budget, generators)
    correct_on_worst, _ = _correctness(model, family, batch, worst)
    assert torch.equal(correct_on_worst, survived)
    assert (BOX.to_pixels(worst) - BOX.to_pixels(batch["pixel_values"])).abs().max() <= 2 / 255 + 1e-5


def test_batches_are_any_iterable_and_read_once(vit_case):
    halves = [
        {key: value[:4] for key, value in vit_case.batch.items()},
        {key: value[4:] for key, value in vit_case.batch.items()},
    ]
    report = evaluate_robustness(vit_case.model, iter(halves), pixel_box=BOX, epsilons=(1 / 255,), steps=1)
    assert report.num_samples == 8 and report.clean_accuracy == 1.0


def test_modes_and_parameter_gradients_are_restored_and_untouched():
    case = tm.vit()
    model = get_peft_model(
        case.model, LoraConfig(target_modules=case.target_modules, modules_to_save=case.modules_to_save)
    )
    model.train()
    frozen_part = model.base_model.model.vit.embeddings.patch_embeddings
    frozen_part.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.grad = torch.full_like(parameter, 0.5)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    seen_training = []
    model.base_model.model.vit.embeddings.dropout.register_forward_hook(
        lambda m, i, o: seen_training.append(m.training)
    )

    evaluate_robustness(model, [case.batch], pixel_box=BOX, epsilons=(2 / 255,), steps=2, restarts=2)

    assert seen_training and not any(seen_training)  # dropout off in every pass
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes and not frozen_part.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in trainable)


class _WindowClassifier(nn.Module):
    """Right (class 0) unless the mean pixel is shifted into (0.5/255, 3/255) above gray; its loss gradient is a
    constant +1 that says nothing about that decision, like a non-differentiable input transform would. PGD then
    lands on gray + epsilon: fooled at 1/255 and 2/255, right again at 4/255."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, pixel_values, labels=None):
        shift = pixel_values.detach().mean(dim=(1, 2, 3)) - 0.5
        fooled = ((shift > 0.5 / 255) & (shift < 3 / 255)).float()
        logits = torch.stack([1 - fooled, fooled], dim=1) * self.scale
        loss = None
        if labels is not None:
            uninformative = (
                pixel_values.sum() - pixel_values.sum().detach()
            )  # value 0, gradient +1 everywhere
            loss = F.cross_entropy(logits, labels) + uninformative
        return ImageClassifierOutput(loss=loss, logits=logits)


def test_masking_check_fires_when_robust_accuracy_rises_with_epsilon():
    batch = {"pixel_values": torch.full((4, 3, 4, 4), 0.5), "labels": torch.zeros(4, dtype=torch.long)}
    with pytest.warns(GradientMaskingWarning, match="rises with epsilon"):
        report = evaluate_robustness(_WindowClassifier(), [batch], pixel_box=PixelBox(), steps=4)
    assert report.robust_accuracy == {"1/255": 0.0, "2/255": 0.0, "4/255": 1.0}
    check = report.checks["non_increasing_in_epsilon"]
    assert check["passed"] is False and not report.passed_checks
    assert {"smaller": "2/255", "larger": "4/255", "smaller_accuracy": 0.0, "larger_accuracy": 1.0} in check[
        "violations"
    ]
    assert "FAILED: non_increasing_in_epsilon" in report.markdown_table()


class _ThresholdClassifier(nn.Module):
    """Class 1 when the mean pixel exceeds 1, which only pixels outside the [0, 1] box can do."""

    def forward(self, pixel_values, labels=None):
        mean = pixel_values.mean(dim=(1, 2, 3))
        logits = torch.stack([torch.zeros_like(mean), 50 * (mean - 1)], dim=1)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def test_epsilon_zero_check_fires_when_pixels_lie_outside_the_box():
    batch = {"pixel_values": torch.full((2, 3, 4, 4), 1.5), "labels": torch.ones(2, dtype=torch.long)}
    with pytest.warns(GradientMaskingWarning, match="zero budget"):
        report = evaluate_robustness(
            _ThresholdClassifier(), [batch], pixel_box=PixelBox(), epsilons=(0, 1 / 255), steps=2
        )
    check = report.checks["epsilon_zero_equals_clean"]
    assert check["passed"] is False and check["mismatched_samples"] == 2
    assert report.clean_accuracy == 1.0 and report.robust_accuracy["0"] == 0.0


def test_masking_checks_on_crafted_numbers():
    good = gradient_masking_checks(
        0.9,
        {"1/255": 0.6, "4/255": 0.2},
        epsilon_zero_accuracy=0.9,
        epsilon_zero_mismatches=0,
        weaker_attack={
            "epsilon": "4/255",
            "steps": 20,
            "weaker_steps": 10,
            "robust_accuracy": 0.2,
            "weaker_robust_accuracy": 0.25,
        },
    )
    assert all(check["passed"] for check in good.values())

    bad = gradient_masking_checks(
        0.9,
        {"4/255": 0.5, "1/255": 0.4, "8/255": 0.95},
        epsilon_zero_accuracy=0.85,
        weaker_attack={
            "epsilon": "8/255",
            "steps": 20,
            "weaker_steps": 10,
            "robust_accuracy": 0.5,
            "weaker_robust_accuracy": 0.3,
        },
        tolerance=0.02,
    )
    assert bad["epsilon_zero_equals_clean"]["passed"] is False
    pairs = {(v["smaller"], v["larger"]) for v in bad["non_increasing_in_epsilon"]["violations"]}
    assert pairs == {("1/255", "4/255"), ("clean", "8/255"), ("1/255", "8/255"), ("4/255", "8/255")}
    assert bad["more_steps_not_weaker"]["passed"] is False
    within_tolerance = gradient_masking_checks(0.5, {"1/255": 0.4, "2/255": 0.41}, tolerance=0.02)
    assert within_tolerance["non_increasing_in_epsilon"]["passed"]
    assert within_tolerance["more_steps_not_weaker"]["passed"] is None


def test_prompt_classification_with_clip(no_masking_warning):
    case = tm.clip(prompts=True)
    model = case.model.eval()
    with torch.no_grad():
        predicted = model(
            pixel_values=case.batch["pixel_values"], **case.class_text_inputs
        ).logits_per_image.argmax(-1)
    expected = predicted.eq(case.batch["labels"]).float().mean().item()
    report = evaluate_robustness(
        model,
        [case.batch],
        pixel_box=BOX,
        epsilons=(0, 8 / 255),
        steps=2,
        class_text_inputs=case.class_text_inputs,
    )
    assert (
        report.clean_accuracy == pytest.approx(expected)
        and report.robust_accuracy["0"] == report.clean_accuracy
    )
    assert zero_shot_accuracy(model, [case.batch], case.class_text_inputs) == pytest.approx(expected)

    self_labelled = {**case.batch, "labels": predicted}
    assert zero_shot_accuracy(model, [self_labelled], case.class_text_inputs) == 1.0
    report = evaluate_robustness(
        model,
        [self_labelled],
        pixel_box=BOX,
        epsilons=(128 / 255,),  # untrained: one class wins every image by a wide margin
        steps=5,
        class_text_inputs=case.class_text_inputs,
    )
    assert report.clean_accuracy == 1.0 and report.robust_accuracy["128/255"] < 1.0


def test_contrastive_clip_scores_in_batch_retrieval():
    case = tm.clip()
    model = case.model.eval()
    with torch.no_grad():
        logits = model(**case.batch).logits_per_image
    expected = logits.argmax(-1).eq(torch.arange(4)).float().mean().item()
    # in this untrained model one caption wins for every image by a wide margin: only a large budget breaks it
    report = evaluate_robustness(
        model, [case.batch], pixel_box=BOX, epsilons=(64 / 255,), steps=3, check_steps=False
    )
    assert expected > 0 and report.num_samples == 4 and report.clean_accuracy == pytest.approx(expected)
    assert report.robust_accuracy["64/255"] < report.clean_accuracy
    assert report.attack["loss"] == "dual_encoder task loss"


def test_contrastive_correctness_counts_ties_as_misses():
    family = detect_family(tm.clip().model)
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    correct, scored = prediction_correctness(family, FamilyOutput(torch.zeros(()), logits, None, None), {})
    assert correct.tolist() == [True, False, False] and scored.all()


def _llava_self_labelled():
    case = tm.llava()
    model = case.model.eval()
    with torch.no_grad():
        predicted = model(**case.batch).logits.argmax(-1)
    labels = case.batch["labels"].clone()
    answer = labels[:, 1:].ne(-100)
    labels[:, 1:] = torch.where(answer, predicted[:, :-1], labels[:, 1:])
    return model, {**case.batch, "labels": labels}


def test_generative_answer_accuracy_is_exact_match_of_the_answer():
    model, batch = _llava_self_labelled()
    assert clean_accuracy(model, [batch]) == 1.0

    one_token_wrong = batch["labels"].clone()
    last = one_token_wrong.shape[1] - 1
    one_token_wrong[1, last] = (one_token_wrong[1, last] + 1) % 60
    assert clean_accuracy(model, [{**batch, "labels": one_token_wrong}]) == 0.5

    no_answer = one_token_wrong.clone()
    no_answer[1] = -100  # sample 1 has nothing to score
    report = evaluate_robustness(
        model,
        [{**batch, "labels": no_answer}],
        pixel_box=BOX,
        epsilons=(16 / 255,),
        steps=2,
        check_steps=False,
    )
    assert report.num_samples == 1 and report.clean_accuracy == 1.0
    assert report.robust_accuracy["16/255"] == 0.0 and report.attack["loss"] == "generative task loss"


@pytest.mark.parametrize("make", [tm.clip, tm.siglip])
def test_retrieval_recall_over_the_whole_set(make):
    case = make(batch=4, seed=0)
    second = make(batch=4, seed=1).batch
    recalls = retrieval_recall_at_k(case.model, [case.batch, second], ks=(1, 3, 8))
    assert recalls["image_to_text_recall@8"] == recalls["text_to_image_recall@8"] == 1.0  # k >= samples

    joined = {key: torch.cat([case.batch[key], second[key]]) for key in case.batch}
    with torch.no_grad():
        logits = case.model.eval()(**joined).logits_per_image
    matching = logits.diagonal()
    others = ~torch.eye(8, dtype=torch.bool)
    image_rank = ((logits >= matching[:, None]) & others).sum(1)
    text_rank = ((logits >= matching[None, :]) & others).sum(0)
    for k in (1, 3):
        assert recalls[f"image_to_text_recall@{k}"] == pytest.approx(image_rank.lt(k).float().mean().item())
        assert recalls[f"text_to_image_recall@{k}"] == pytest.approx(text_rank.lt(k).float().mean().item())


def test_dual_encoder_metrics_refuse_other_models(vit_case):
    with pytest.raises(ValueError, match="dual encoder"):
        retrieval_recall_at_k(vit_case.model, [vit_case.batch])


def test_image_features_are_unit_norm_and_follow_the_batches():
    case = tm.clip(batch=4, seed=0)
    second = tm.clip(batch=4, seed=1).batch
    features = image_features(case.model, [case.batch, second])
    assert features.shape[0] == 8
    assert torch.allclose(features.norm(dim=-1), torch.ones(8), atol=1e-5)
    with torch.no_grad():
        direct = case.model.eval().get_image_features(pixel_values=second["pixel_values"])
    direct = getattr(direct, "pooler_output", direct)
    assert torch.allclose(features[4:], F.normalize(direct, dim=-1), atol=1e-5)


def test_linear_probe_separates_what_the_features_hold_and_not_what_they_miss():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    informative = torch.randn(300, 8, generator=generator) + 3.0 * F.one_hot(labels, 8)
    noise_only = torch.randn(300, 8, generator=generator)
    train, held_out = slice(0, 200), slice(200, 300)
    assert (
        linear_probe_accuracy(informative[train], labels[train], informative[held_out], labels[held_out])
        > 0.9
    )
    chance = linear_probe_accuracy(noise_only[train], labels[train], noise_only[held_out], labels[held_out])
    assert chance < 0.55  # 3 classes: chance is 1/3
    with pytest.raises(ValueError, match="pair up"):
        linear_probe_accuracy(informative[train], labels[:10], informative[held_out], labels[held_out])
