"""Closed-set answers of a generative VLM read as class predictions: the answers' first tokens at the answer position
are the class logits (what AutoAttack attacks), rows grouped by prompt (one question, many images), and the greedy
`generate` answer scored on the same images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# AutoAttack's targeted attacks (APGD-T's and FAB-T's DLR loss) read the 3rd and 4th largest class logits.
MIN_CLASSES = 4


@dataclass(frozen=True)
class ClosedSetAnswers:
    """The answers of a closed-set question set, as classes of the answer position's next-token logits.

    Class `k < len(answers)` is answer `k`, scored by the logit of its first token (the first tokens are all
    different, so the first answer token names the answer). The remaining `other_classes` classes are the strongest
    tokens that begin no answer, in order: greedy generation whose first token is one of them answers none of the
    answers, so a sample pushed there counts as wrong, never as still right. There is at least one such class, and
    as many as make `MIN_CLASSES` classes in all (a yes/no question set has two answers and two other classes).
    With them, the argmax class is exactly the class of the first token greedy generation picks.
    """

    answers: tuple[str, ...]
    token_ids: tuple[int, ...]
    """First token of each answer (as the model's tokenizer writes the answer after the prompt)."""

    def __post_init__(self) -> None:
        if len(self.answers) != len(self.token_ids) or not self.answers:
            raise ValueError(
                f"ClosedSetAnswers needs one first token per answer and at least one answer, got {len(self.answers)} "
                f"answers and {len(self.token_ids)} token ids."
            )
        seen: dict[int, str] = {}
        for answer, token in zip(self.answers, self.token_ids, strict=True):
            if token in seen:
                raise ValueError(
                    f"ClosedSetAnswers.answers={list(self.answers)!r}: {seen[token]!r} and {answer!r} begin with the "
                    f"same token ({token}), so the first answer token cannot tell them apart; allowed: answers whose "
                    "first tokens all differ."
                )
            seen[token] = answer

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, answers: Sequence[str]) -> ClosedSetAnswers:
        """Each answer's first token as the tokenizer writes the answer alone (no special tokens), as
        `ran_peft.data.vqa.VQACollator` writes the labels."""
        if isinstance(answers, str) or not answers:
            raise ValueError(f"answers={answers!r} is not allowed: a non-empty list of answer strings.")
        if len(set(answers)) != len(answers):
            raise ValueError(f"answers={list(answers)!r} is not allowed: each answer once.")
        unknown = getattr(tokenizer, "unk_token_id", None)
        token_ids = []
        for answer in answers:
            ids = tokenizer(str(answer), add_special_tokens=False)["input_ids"]
            if not ids or (unknown is not None and ids[0] == unknown):
                raise ValueError(
                    f"the answer {answer!r} has no first token in this tokenizer (it writes {ids}); allowed: answers "
                    "the tokenizer writes with known tokens."
                )
            token_ids.append(int(ids[0]))
        return cls(tuple(str(a) for a in answers), tuple(token_ids))

    @property
    def other_classes(self) -> int:
        return max(1, MIN_CLASSES - len(self.answers))

    @property
    def num_classes(self) -> int:
        return len(self.answers) + self.other_classes

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`[N, V]` next-token logits at the answer position -> `[N, num_classes]` class logits (float32)."""
        logits = logits.float()
        ids = torch.tensor(self.token_ids, device=logits.device)
        answers = logits.index_select(-1, ids)
        others = logits.index_fill(-1, ids, float("-inf")).topk(self.other_classes, dim=-1).values
        return torch.cat([answers, others], dim=-1)

    def class_of_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The class of each first answer token: its answer's index, or `len(answers)` (the first other class) for
        a token that begins no answer."""
        table = torch.tensor(self.token_ids, device=token_ids.device)
        match = token_ids.unsqueeze(-1).eq(table)
        return torch.where(
            match.any(-1), match.float().argmax(-1), torch.full_like(token_ids, len(self.answers))
        )


def answer_start(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the first answer token (the first label that is not -100); -1 for none."""
    counted = labels.ne(-100)
    first = counted.float().argmax(-1)
    return torch.where(counted.any(-1), first, torch.full_like(first, -1))


@dataclass
class PromptGroup:
    """Rows of one batch that share the prompt (everything before the answer) and every other non-pixel input."""

    rows: torch.Tensor
    """Indices of the rows in the batch."""
    text_inputs: dict[str, torch.Tensor]
    """The shared prompt inputs, one row each (`input_ids`, `attention_mask`, ...), to broadcast over images."""
    answers: list[list[int]]
    """Each row's answer tokens as the labels hold them (EOS included), for scoring generated answers."""


# Inputs that are neither pixels nor the prompt's text: not part of the prompt group's key.
_NOT_PROMPT = ("pixel_values", "labels")


def group_by_prompt(inputs: Mapping[str, Any]) -> list[PromptGroup]:
    """Split a generative batch into groups of rows that share their prompt (`input_ids` before the first label and
    every other per-row input), in order of first appearance. Rows without an answer token are left out.

    The AutoAttack view attacks one group at a time: torchattacks calls the model on any subset of the images it was
    given, so the text beside them must be the same for every row.
    """
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    batch, length = input_ids.shape
    starts = answer_start(labels)
    groups: dict[tuple, PromptGroup] = {}
    for row in range(batch):
        start = int(starts[row])
        if start < 1:
            continue
        text: dict[str, torch.Tensor] = {}
        for key, value in inputs.items():
            if (
                key in _NOT_PROMPT
                or not torch.is_tensor(value)
                or value.dim() == 0
                or value.shape[0] != batch
            ):
                continue
            # Per-token inputs (ids, masks, token types) are cut at the answer; per-row ones are kept whole.
            text[key] = (
                value[row : row + 1, :start]
                if value.dim() >= 2 and value.shape[1] == length
                else value[row : row + 1]
            )
        key = tuple((name, tuple(tensor.flatten().tolist())) for name, tensor in sorted(text.items()))
        answer = labels[row, start:]
        answer = answer[answer.ne(-100)].tolist()
        if key not in groups:
            groups[key] = PromptGroup(rows=[], text_inputs=text, answers=[])
        groups[key].rows.append(row)
        groups[key].answers.append(answer)
    for group in groups.values():
        group.rows = torch.tensor(group.rows, dtype=torch.long, device=input_ids.device)
    return list(groups.values())


def expand_text_inputs(text_inputs: Mapping[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """A prompt group's shared inputs repeated for `count` images."""
    return {key: value.expand(count, *value.shape[1:]) for key, value in text_inputs.items()}


@torch.no_grad()
def greedy_answers_right(
    model: torch.nn.Module,
    text_inputs: Mapping[str, torch.Tensor],
    pixel_values: torch.Tensor,
    answers: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Greedy `generate` from the prompt on each image: right when the generated tokens are the answer's tokens,
    EOS included (exact match of the whole answer, as the labels write it). Bool `[N]`."""
    count = pixel_values.shape[0]
    longest = max(len(answer) for answer in answers)
    prompt = expand_text_inputs(text_inputs, count)
    generated = model.generate(
        **prompt,
        pixel_values=pixel_values,
        max_new_tokens=longest,
        do_sample=False,
        num_beams=1,
    )
    new_tokens = generated[:, prompt["input_ids"].shape[1] :]
    right = torch.zeros(count, dtype=torch.bool)
    for index, answer in enumerate(answers):
        right[index] = new_tokens[index, : len(answer)].tolist() == list(answer)
    return right
