"""AutoAttack on a generative VLM's closed-set answers: the classifier view agrees with greedy generation, the budget
is exact in pixel units through the generative pixel layout, and a gradient-masked generative model is caught."""

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from ran_peft import BatchPixelBox, PixelBox
from ran_peft.autoattack import (
    AutoAttackSettings,
    GenerativeClassifierView,
    _autoattack_steps,
    autoattack_cascade,
    evaluate_autoattack,
)
from ran_peft.closed_set import ClosedSetAnswers, greedy_answers_right, group_by_prompt
from ran_peft.data.vqa import VQACollator, synthetic_closed_vqa
from ran_peft.evaluation import GradientMaskingWarning

TINY = AutoAttackSettings("test", apgd_steps=10, targets=2, fab_steps=10, square_queries=60, large_steps=10)
QUESTIONS = ("Which organ is shown?", "Is this a CT image?")
# Not the model's own normalisation, and different per channel: a budget in the wrong units shows.
BOX = PixelBox((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


@pytest.fixture(scope="module")
def llava(tiny_generative_default):
    """The tiny generative default's architecture and processor with random weights drawn wider than transformers'
    default, so that the first answer token varies from image to image and question to question (the tiny trained
    one answers every question alike)."""
    config = AutoConfig.from_pretrained(tiny_generative_default)
    for part in (config, config.text_config, config.vision_config):
        part.initializer_range = 0.5
    config.vision_config.initializer_factor = 2.0
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return model, AutoProcessor.from_pretrained(tiny_generative_default)


def _rows(count=12, seed=3):
    """Rows of the closed-set task asking two questions only (two prompt groups)."""
    rows = synthetic_closed_vqa(count, seed=seed, split_name="test", image_size=32)

    def ask(row, index):
        if index % 2 == 0:
            return {"question": QUESTIONS[0], "answer": row["anatomy"]}
        return {"question": QUESTIONS[1], "answer": "yes" if row["modality"] == "CT" else "no"}

    return rows.map(ask, with_indices=True)


def _first_greedy_tokens(model, batch):
    """The first token greedy generation picks after each row's prompt."""
    first = []
    for group in group_by_prompt(batch):
        count = len(group.rows)
        prompt = {key: value.expand(count, *value.shape[1:]) for key, value in group.text_inputs.items()}
        with torch.no_grad():
            generated = model.generate(
                **prompt, pixel_values=batch["pixel_values"][group.rows], max_new_tokens=1, do_sample=False
            )
        first.append((group, generated[:, -1]))
    return first


def _answered_by_the_model(model, processor, rows):
    """The rows with each answer replaced by the model's own greedy first token (clean accuracy 1 by construction),
    and the answer set those tokens make. Rows whose token is a special token are dropped."""
    collator = VQACollator(processor)
    batch = collator([rows[i] for i in range(len(rows))])
    tokens = {}
    for group, first in _first_greedy_tokens(model, batch):
        for row, token in zip(group.rows.tolist(), first.tolist(), strict=True):
            tokens[row] = token
    special = set(processor.tokenizer.all_special_ids)
    keep = sorted(row for row, token in tokens.items() if token not in special)
    words = {row: processor.tokenizer.convert_ids_to_tokens(tokens[row]) for row in keep}
    rows = rows.select(keep).map(lambda row, index: {"answer": words[keep[index]]}, with_indices=True)
    return rows, ClosedSetAnswers.from_tokenizer(processor.tokenizer, sorted(set(words.values())))


def test_on_clean_inputs_the_classifier_view_predicts_greedy_generations_first_answer_token(llava):
    model, processor = llava
    batch = VQACollator(processor)([_rows()[i] for i in range(12)])
    first = _first_greedy_tokens(model, batch)
    predicted = sorted({token for _, tokens in first for token in tokens.tolist()})
    # half of the tokens greedy generation picks are answers, the others are not: both cases are checked
    answers = ClosedSetAnswers.from_tokenizer(
        processor.tokenizer, processor.tokenizer.convert_ids_to_tokens(predicted[::2])
    )
    classes = []
    box = BatchPixelBox.place(PixelBox.from_processor(processor), batch)
    for group, tokens in first:
        view = GenerativeClassifierView(model, answers, group.text_inputs, box, batch["pixel_values"].dtype)
        with torch.no_grad():
            predicted_class = view(view.to_pixels(batch["pixel_values"][group.rows])).argmax(-1)
        assert predicted_class.tolist() == answers.class_of_tokens(tokens).tolist()
        classes += predicted_class.tolist()
    assert len(set(classes)) > 1 and any(c < len(answers.answers) for c in classes)
    assert any(c == len(answers.answers) for c in classes)  # a token that begins no answer: the "other" class


def test_greedy_scoring_is_exact_match_of_the_whole_answer(llava):
    model, processor = llava
    rows, _ = _answered_by_the_model(model, processor, _rows())
    batch = VQACollator(processor)([rows[i] for i in range(len(rows))])
    group = group_by_prompt(batch)[0]
    pixels = batch["pixel_values"][group.rows]
    right = greedy_answers_right(model, group.text_inputs, pixels, group.answers)
    # the first token is the model's own, but the whole answer (word, then EOS) must be generated to count
    with torch.no_grad():
        count = len(group.rows)
        prompt = {key: value.expand(count, *value.shape[1:]) for key, value in group.text_inputs.items()}
        generated = model.generate(**prompt, pixel_values=pixels, max_new_tokens=2, do_sample=False)[:, -2:]
    eos = processor.tokenizer.eos_token_id
    assert right.tolist() == generated[:, 1].eq(eos).tolist()


def test_every_attack_spends_exactly_the_budget_in_pixel_units_through_the_generative_layout(llava):
    model, processor = llava
    rows, answers = _answered_by_the_model(model, processor, _rows())
    batch = VQACollator(processor)([rows[i] for i in range(len(rows))])
    # the model sees pixels normalised by BOX: the threat model is BOX's [0, 1] pixels
    batch["pixel_values"] = BOX.from_pixels(
        PixelBox.from_processor(processor).to_pixels(batch["pixel_values"])
    )
    placed = BatchPixelBox.place(BOX, batch)
    group = max(group_by_prompt(batch), key=lambda g: len(g.rows))
    view = GenerativeClassifierView(model, answers, group.text_inputs, placed, torch.float32)
    clean_values = batch["pixel_values"][group.rows]
    pixels = view.to_pixels(clean_values)
    with torch.no_grad():
        labels = view(pixels).argmax(-1)
    epsilon = 8 / 255
    group_box = BatchPixelBox.place(BOX, {"pixel_values": clean_values})
    for name, make in _autoattack_steps(TINY, epsilon, answers.num_classes, seed=0):
        examples = pixels.clone()
        start = torch.ones(len(pixels), dtype=torch.bool)
        robust, counts = autoattack_cascade(view, pixels, labels, start, epsilon, [(name, make)], examples)
        fooled = ~robust
        assert fooled.any(), name  # the images each attack found are what is measured
        # what the model is given, measured back in pixel units per channel through the group's layout
        size = group_box.linf_in_pixels(view.to_model_inputs(examples) - clean_values)
        assert float(size.max()) <= epsilon + 1e-6, (name, size)
        assert float(counts[name]["max_perturbation"]) <= epsilon + 1e-6, name
        assert float(size[~fooled].sum()) < 1e-6  # samples not fooled keep their clean image
        if name != "fab-t":  # FAB looks for the smallest perturbation; the others use the whole ball
            assert size[fooled].tolist() == pytest.approx([epsilon] * int(fooled.sum()), abs=1e-5), (
                name,
                size,
            )
        assert float(examples.min()) >= 0.0 and float(examples.max()) <= 1.0


def test_a_gradient_masked_generative_model_is_caught(llava):
    model, processor = llava
    rows, answers = _answered_by_the_model(model, processor, _rows(24))
    loader = [VQACollator(processor)([rows[i] for i in range(len(rows))])]

    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = evaluate_autoattack(
                model,
                loader,
                pixel_box=PixelBox.from_processor(processor),
                epsilons=(8 / 255,),
                version=TINY,
                answers=answers,
                seed=0,
            )
        return report, [w for w in caught if issubclass(w.category, GradientMaskingWarning)]

    honest, honest_warnings = run()
    # the same function with a zero input gradient: the projector's output detached (gradient masking)
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: out.detach() + 0 * out)
    try:
        masked, masked_warnings = run()
    finally:
        hook.remove()
    assert honest.clean_accuracy == masked.clean_accuracy == 1.0
    assert honest.checks["black_box_not_stronger"]["passed"] is True and not honest_warnings
    assert masked.checks["black_box_not_stronger"]["passed"] is False
    assert not masked.passed_checks and masked_warnings
    assert (
        masked.robust_accuracy["8/255"] > honest.robust_accuracy["8/255"]
        or honest.robust_accuracy["8/255"] == 0
    )
    # the generated answers are scored on the adversarial images found, and can only be fooled where the view was
    assert honest.generation["robust_accuracy"]["8/255"] <= honest.generation["clean_accuracy"]


def test_answers_that_share_a_first_token_are_refused():
    class WordTokenizer:
        unk_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [hash(word) % 1000 + 1 for word in text.split()]}

    with pytest.raises(ValueError, match="'chest' and 'chest x-ray' begin with the same token"):
        ClosedSetAnswers.from_tokenizer(WordTokenizer(), ["chest", "chest x-ray"])
    answers = ClosedSetAnswers.from_tokenizer(WordTokenizer(), ["yes", "no"])
    assert answers.num_classes == 4 and answers.other_classes == 2  # AutoAttack's DLR loss reads 4 logits


def test_open_answers_are_refused_by_autoattack_with_what_to_use(llava):
    model, processor = llava
    rows = _rows(4)
    answers = ClosedSetAnswers.from_tokenizer(processor.tokenizer, ["yes", "no"])
    loader = [VQACollator(processor)([rows[i] for i in range(4)])]
    with pytest.raises(ValueError, match="closed-set questions only"):
        evaluate_autoattack(
            model, loader, pixel_box=PixelBox.from_processor(processor), version=TINY, answers=answers
        )
    with pytest.raises(ValueError, match="needs `answers`"):
        evaluate_autoattack(model, loader, pixel_box=PixelBox.from_processor(processor), version=TINY)


def test_open_questions_get_pgd_on_the_answer_loss_labelled_apart_from_the_closed_ones(llava):
    from ran_peft.experiments import ExperimentSettings, evaluate_generative_adapter

    model, processor = llava
    rows = _rows(8)  # organ questions (open here: their answers are not yes/no) and yes/no ones (closed)
    settings = ExperimentSettings(eval_attack="autoattack-quick", eval_epsilons=(4 / 255,), eval_batch_size=8)
    record = evaluate_generative_adapter(
        model,
        rows,
        VQACollator(processor),
        PixelBox.from_processor(processor),
        settings,
        answers=["yes", "no"],
    )
    assert record["closed_rows"] == 4 and record["open_rows"] == 4
    assert record["attack"]["name"] == "AutoAttack-quick" and record["num_samples"] == 4
    opened = record["open_questions"]
    assert opened["num_samples"] == 4 and opened["attack"]["name"] == "PGD-50"
    assert (
        "restarts" in opened["attack"]["description"] and "generative task loss" in opened["attack"]["loss"]
    )
    assert opened["robust_accuracy"]["4/255"] <= opened["clean_accuracy"]
