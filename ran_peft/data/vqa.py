"""Visual question answering on the synthetic scans: the closed-set task the generative examples and benchmarks
fine-tune on (VQA-RAD's closed questions: yes/no, organ and modality names), the instruction data the offline
generative default is pre-trained on, and the collator that turns (image, question, answer) rows into a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from ran_peft.data.synthetic import ANATOMIES, FINDINGS, MODALITIES, synthetic_medical_dataset

# --------------------------------------------------------------------------------------------------------------
# The closed-set task (fine-tuning and evaluation)
# --------------------------------------------------------------------------------------------------------------

# Question templates per question type, as VQA-RAD's closed questions ask them: the organ, the modality, and a yes/no
# question that names a modality (the true one half of the time). A few phrasings per type, so that the whole
# evaluation set holds few distinct prompts (the AutoAttack view of a generative model attacks one prompt at a time).
# A yes/no question naming an organ ("Does this image show the knee?") was tried and left out: LoRA fine-tuning of
# the generative default stayed at chance on it (51-55 % after 150-300 steps), so it measured nothing.
CLOSED_QUESTIONS: dict[str, tuple[str, ...]] = {
    "organ": ("Which organ is shown?", "What organ is this?"),
    "modality": ("What is the imaging modality?", "What modality is used?"),
    "is_modality": ("Is this {article} {modality} image?",),
}
# Every answer of the closed-set task; the first words are all different, so the first answer token names the answer.
CLOSED_ANSWERS: tuple[str, ...] = ("yes", "no", *ANATOMIES, *MODALITIES)


def _article(word: str) -> str:
    # Said aloud: "an MRI", "an X-ray", "an ultrasound", "a CT".
    return "an" if word[0].lower() in "aeiou" or word in ("MRI", "X-ray") else "a"


def closed_question_texts() -> list[str]:
    """Every question the closed-set task can ask (for tokenizers built offline)."""
    texts = [*CLOSED_QUESTIONS["organ"], *CLOSED_QUESTIONS["modality"]]
    for template in CLOSED_QUESTIONS["is_modality"]:
        texts += [template.format(article=_article(m), modality=m) for m in MODALITIES]
    return texts


def synthetic_closed_vqa(
    n: int, *, seed: int = 0, split_name: str | None = None, image_size: int = 64
) -> datasets.Dataset:
    """The closed-set medical VQA task on synthetic scans: `image`, `question`, `answer`, `question_type`.

    Question types come in equal shares, in a seeded order: `organ` ("Which organ is shown?" -> "liver"),
    `modality` ("What is the imaging modality?" -> "MRI") and `is_modality` ("Is this a CT image?" -> "yes"/"no",
    naming the true modality half of the time). Every answer is one of `CLOSED_ANSWERS`. The images are those of
    `synthetic_medical_dataset(n, seed=seed, split_name=split_name, task="anatomy")` (organs balanced).
    """
    rows = synthetic_medical_dataset(
        n, seed=seed, image_size=image_size, task="anatomy", split_name=split_name
    )
    anatomy, modality = rows["anatomy"], rows["modality"]  # reads no image
    # A stream of its own, so the questions never shift the images (and the images never shift the questions).
    rng = np.random.default_rng([seed, 7, n])
    types = list(CLOSED_QUESTIONS)
    kinds = [types[index] for index in rng.permutation(np.arange(n) % len(types))]
    questions, answers = [], []
    for index, kind in enumerate(kinds):
        templates = CLOSED_QUESTIONS[kind]
        template = templates[int(rng.integers(len(templates)))]
        truth_is_asked = bool(rng.integers(2))
        if kind == "organ":
            question, answer = template, anatomy[index]
        elif kind == "modality":
            question, answer = template, modality[index]
        else:
            others = [name for name in MODALITIES if name != modality[index]]
            asked = modality[index] if truth_is_asked else others[int(rng.integers(len(others)))]
            question = template.format(article=_article(asked), modality=asked)
            answer = "yes" if truth_is_asked else "no"
        questions.append(question)
        answers.append(answer)
    return (
        rows.add_column("question", questions)
        .add_column("answer", answers)
        .add_column("question_type", kinds)
    )


# --------------------------------------------------------------------------------------------------------------
# Instruction data (pre-training of the offline generative default)
# --------------------------------------------------------------------------------------------------------------

DESCRIBE_QUESTION = "Describe the image."
# Pre-training asks about organ and modality in one of the task's phrasings and one of its own, and yes/no about
# modality, organ and normality in its own words: the pre-trained model knows the answers and their format, and
# fine-tuning still has the task's other phrasings and its own yes/no question to learn.
INSTRUCTION_QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": (DESCRIBE_QUESTION,),
    "organ": ("Which organ is shown?", "Name the organ in this scan."),
    "modality": ("What is the imaging modality?", "Which imaging technique was used?"),
    "finding": ("What is the main finding?",),
    "normal": ("Is this study normal?",),
    "is_modality": ("Was this scan acquired with {modality}?",),
    "is_organ": ("Is the {organ} visible in this scan?",),
}


def instruction_question_texts() -> list[str]:
    """Every question of the instruction data (for tokenizers built offline)."""
    texts = []
    for questions in INSTRUCTION_QUESTIONS.values():
        for question in questions:
            if "{modality}" in question:
                texts += [question.format(modality=name) for name in MODALITIES]
            elif "{organ}" in question:
                texts += [question.format(organ=name) for name in ANATOMIES]
            else:
                texts.append(question)
    return texts


def instruction_pairs(
    rows: datasets.Dataset, *, seed: int = 0, describe_only: bool = False
) -> list[tuple[str, str]]:
    """One (question, answer) pair per row of `synthetic_medical_dataset` rows: the alignment data
    (`describe_only`: "Describe the image." -> the caption) or the instruction mix (every type in equal shares;
    the yes/no modality question names the true modality half of the time)."""
    rng = np.random.default_rng([seed, 11, len(rows)])
    columns = {name: rows[name] for name in ("caption", "anatomy", "modality", "finding")}
    types = ["describe"] if describe_only else list(INSTRUCTION_QUESTIONS)
    pairs = []
    for index, kind in enumerate(rng.permutation(np.arange(len(rows)) % len(types))):
        name = types[kind]
        templates = INSTRUCTION_QUESTIONS[name]
        question = templates[int(rng.integers(len(templates)))]
        if name == "describe":
            answer = columns["caption"][index]
        elif name == "normal":
            answer = "yes" if columns["finding"][index] == FINDINGS[0] else "no"
        elif name in ("is_modality", "is_organ"):
            names, column = (MODALITIES, "modality") if name == "is_modality" else (ANATOMIES, "anatomy")
            truth = columns[column][index]
            others = [other for other in names if other != truth]
            asked = truth if rng.integers(2) else others[int(rng.integers(len(others)))]
            question, answer = question.format(**{name[3:]: asked}), "yes" if asked == truth else "no"
        else:
            answer = columns[{"organ": "anatomy"}.get(name, name)][index]
        pairs.append((question, answer))
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Batches: (image, question, answer) rows -> LLaVA-style inputs with labels on the answer only
# --------------------------------------------------------------------------------------------------------------


class VQACollator:
    """Rows -> `pixel_values`, `input_ids`, `attention_mask`, `labels` for a LLaVA-style model.

    Each sequence is the processor's prompt (chat template if the processor has one, image tokens already expanded
    by the processor) followed by the answer tokens and EOS; `labels` are -100 on the prompt and padding and the
    token ids on the answer, one label per input position (what RAN's generative family needs). The prompt is
    everything before the first label, so the logits at its last position are the first answer token's.
    """

    def __init__(self, processor: Any, max_answer_tokens: int = 64):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_answer_tokens = max_answer_tokens
        self.pad_id = next(
            (i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None), 0
        )

    def prompt(self, question: str) -> str:
        """The text before the answer: the chat template's user turn and generation prompt, else a plain one."""
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ]
            return self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"{image_token}\n{question}\nAnswer:"

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's token ids as the labels hold them: cut to `max_answer_tokens`, then EOS."""
        ids = self.tokenizer(str(answer), add_special_tokens=False)["input_ids"][: self.max_answer_tokens]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def encode(self, image: Any, question: str) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The processor's image inputs (`pixel_values`, ...) and the prompt's token ids for one row."""
        text = self.prompt(str(question))
        bos = self.tokenizer.bos_token
        # A template that writes the BOS itself must not get a second one from the tokenizer.
        special = not (bos and text.startswith(bos))
        encoded = self.processor(
            images=[image.convert("RGB")], text=[text], add_special_tokens=special, return_tensors="pt"
        )
        prompt_ids = encoded.pop("input_ids")[0].tolist()
        encoded.pop("attention_mask", None)
        eos = self.tokenizer.eos_token_id
        if eos is not None and prompt_ids and prompt_ids[-1] == eos:  # tokenizers that close every text
            prompt_ids = prompt_ids[:-1]
        return dict(encoded), prompt_ids

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = []
        for row in rows:
            images, prompt = self.encode(row["image"], row["question"])
            encoded.append((images, prompt, self.answer_ids(row["answer"])))
        length = max(len(prompt) + len(answer) for _, prompt, answer in encoded)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for index, (_, prompt, answer) in enumerate(encoded):
            sequence = torch.tensor(prompt + answer, dtype=torch.long)
            input_ids[index, : len(sequence)] = sequence
            attention_mask[index, : len(sequence)] = 1
            labels[index, len(prompt) : len(sequence)] = sequence[len(prompt) :]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        # pixel_values and whatever else the processor gives per image (e.g. image_sizes), one row per sample
        for key in encoded[0][0]:
            batch[key] = torch.cat([images[key] for images, _, _ in encoded])
        return batch


def sft_conversations(rows: datasets.Dataset) -> datasets.Dataset:
    """(image, question, answer) rows in TRL's conversational prompt-completion format (`prompt`, `completion`,
    `images`): SFTTrainer puts the loss on the completion, the answer."""

    def convert(row: dict) -> dict:
        question = [{"type": "image"}, {"type": "text", "text": str(row["question"])}]
        return {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": str(row["answer"])}]}],
            "images": [row["image"].convert("RGB")],
        }

    return rows.map(convert, remove_columns=rows.column_names)
