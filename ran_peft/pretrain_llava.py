"""The offline generative default: a small LLaVA (`LlavaForConditionalGeneration`) whose vision tower is the embedded
CLIP's (pre-trained, `ran_peft.pretrain`) and whose projector and language model are trained offline on the synthetic
scans, first on their captions (alignment), then on instruction data (questions and answers). Built on first use and
cached like the embedded CLIP.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ran_peft.pretrain import build_default_model, cache_root, is_built, save_built_model

DEFAULT_LLAVA_NAME = "synthetic-medical-llava-v1"

# "[BOS]USER: <image>\n{question}\nASSISTANT: {answer}[EOS]\n": the template writes BOS and closes the assistant's
# turn with EOS, so TRL's SFTTrainer (which tokenises the rendered chat without special tokens) trains the same
# tokens as `VQACollator`, and greedy generation learns where an answer stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class GenerativeDefaultSettings:
    """Sizes and schedule of the generative default (the defaults build in a few minutes on 2 CPU cores)."""

    hidden_size: int = 128
    """Width of the language model (a Llama); the projector maps the vision tower's width to it."""
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    image_rows: int = 3000
    """Synthetic scans of the pre-training (their vision features are computed once: the tower stays frozen)."""
    alignment_steps: int = 150
    """Stage 1: image -> caption ("Describe the image."), projector and language model trained."""
    instruction_steps: int = 400
    """Stage 2: the instruction mix (`ran_peft.data.vqa.INSTRUCTION_QUESTIONS`)."""
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "intermediate_size", "image_rows", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"GenerativeDefaultSettings.{name}={value!r} is not allowed: an integer >= 1."
                )
        for name in ("alignment_steps", "instruction_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"GenerativeDefaultSettings.{name}={value!r} is not allowed: an integer >= 0."
                )
        if self.hidden_size % self.heads:
            raise ValueError(
                f"GenerativeDefaultSettings.hidden_size={self.hidden_size} is not allowed: it must be a multiple "
                f"of heads={self.heads}."
            )
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ValueError(
                f"GenerativeDefaultSettings.learning_rate={self.learning_rate!r} is not allowed: a number in (0, 1)."
            )


def generative_vocabulary() -> list[str]:
    """Every text the generative default's tokenizer must cover: captions, both question sets, answers, chat roles."""
    from ran_peft.data.vqa import CLOSED_ANSWERS, closed_question_texts, instruction_question_texts
    from ran_peft.text import synthetic_vocabulary

    return [
        *synthetic_vocabulary(),
        *closed_question_texts(),
        *instruction_question_texts(),
        *CLOSED_ANSWERS,
        "USER: ASSISTANT:",
    ]


def offline_llava_processor(image_processor, *, patch_size: int, extra_texts: Sequence[str] = ()):
    """A `LlavaProcessor`: the vision tower's image processor, a word-level tokenizer over `generative_vocabulary()`
    (and `extra_texts`) with an `<image>` token, and `CHAT_TEMPLATE`. Every image becomes the tower's patch tokens
    plus its class token (the "full" feature strategy)."""
    from transformers import LlavaProcessor

    from ran_peft.text import build_word_tokenizer

    tokenizer = build_word_tokenizer([*generative_vocabulary(), *extra_texts], max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,  # CLIP's class token, kept by the "full" strategy
        chat_template=CHAT_TEMPLATE,
    )


def llava_from_clip(clip, processor, settings: GenerativeDefaultSettings):
    """A `LlavaForConditionalGeneration` with `clip`'s vision tower (weights copied) and a fresh Llama of the given
    size; the projector and the language model are random until trained."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    text = LlamaConfig(
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_attention_heads=settings.heads,
        num_hidden_layers=settings.layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=clip.config.vision_config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=processor.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(settings.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


def image_token_count(model) -> int:
    """Image tokens per image: the tower's patches plus its class token (the "full" strategy)."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


@torch.no_grad()
def vision_features(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen tower's features as `LlavaModel.get_image_features` selects them, before the projector."""
    layer = model.config.vision_feature_layer
    tower = model.model.vision_tower
    chunks = []
    for start in range(0, len(pixel_values), batch_size):
        hidden = tower(pixel_values[start : start + batch_size], output_hidden_states=True).hidden_states
        selected = hidden[layer]
        if model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        chunks.append(selected)
    return torch.cat(chunks)


def logits_from_features(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """The model's logits with precomputed vision features in place of its tower: the projector, the merge into the
    token embeddings and the language model exactly as `LlavaModel.forward` runs them (a test compares)."""
    embeddings = model.get_input_embeddings()(input_ids)
    image = model.model.multi_modal_projector(features).to(embeddings.dtype)
    placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeddings = embeddings.masked_scatter(placeholders, image.reshape(-1, image.shape[-1]))
    hidden = model.model.language_model(inputs_embeds=embeddings, attention_mask=attention_mask)
    return model.lm_head(hidden.last_hidden_state)


class _Sequences:
    """(question, answer) pairs as padded token rows, prompts encoded once per distinct question."""

    def __init__(self, collator, image_tokens: int):
        from PIL import Image

        self.collator = collator
        self.blank = Image.new("RGB", (8, 8))
        self.prompts: dict[str, list[int]] = {}
        self.image_tokens = image_tokens

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self.prompts:
            _, ids = self.collator.encode(self.blank, question)
            self.prompts[question] = ids
        return self.prompts[question]

    def tensors(self, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [(self.prompt_ids(q), self.collator.answer_ids(a)) for q, a in pairs]
        length = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((len(rows), length), self.collator.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, (prompt, answer) in enumerate(rows):
            sequence = torch.tensor(prompt + answer)
            input_ids[index, : len(sequence)] = sequence
            labels[index, len(prompt) : len(sequence)] = sequence[len(prompt) :]
            attention_mask[index, : len(sequence)] = 1
        return input_ids, attention_mask, labels


def train_on_features(
    model,
    features: torch.Tensor,
    make_pairs,
    sequences: _Sequences,
    *,
    steps: int,
    settings: GenerativeDefaultSettings,
    stage: str,
    progress: bool,
) -> list[float]:
    """Train the projector and the language model (the tower is frozen) for `steps` steps on cached features.

    `make_pairs(epoch)` gives one (question, answer) pair per image: each epoch can ask other questions. Returns the
    loss of every step.
    """
    if steps == 0:
        return []
    trainable = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(settings.seed + (0 if stage == "alignment" else 1))
    batch = min(settings.batch_size, len(features))
    per_epoch = len(features) // batch
    model.train()
    losses: list[float] = []
    bar = tqdm(total=steps, desc=f"generative default: {stage}", disable=not progress)
    for epoch in range(math.ceil(steps / per_epoch)):
        input_ids, attention_mask, labels = sequences.tensors(make_pairs(epoch))
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, per_epoch * batch, batch):
            rows = order[start : start + batch]
            width = int(attention_mask[rows].sum(1).max())  # no column of padding alone
            logits = logits_from_features(
                model, input_ids[rows, :width], attention_mask[rows, :width], features[rows]
            )
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[rows, 1:width].flatten(), ignore_index=-100
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) == steps:
                bar.close()
                return losses
    bar.close()
    return losses


def build_default_llava(
    cache_dir: str | os.PathLike | None = None,
    *,
    vision_model: str | os.PathLike | None = None,
    settings: GenerativeDefaultSettings | None = None,
    progress: bool = True,
) -> Path:
    """The generative default, built once: returns its folder (model and processor, `from_pretrained`-ready).

    `vision_model`: folder of the CLIP whose vision tower and image processor it takes (default: the embedded CLIP,
    built first if needed). The build: render `settings.image_rows` synthetic scans (a split of their own), compute
    the frozen tower's features once, train projector and language model on "Describe the image." -> caption
    (alignment), then on the instruction mix (`ran_peft.data.vqa.INSTRUCTION_QUESTIONS`). The folder appears whole
    or not at all; its build marker records the settings, the losses and the build time.
    """
    from transformers import CLIPModel, CLIPProcessor

    from ran_peft.data import synthetic_medical_dataset
    from ran_peft.data.vqa import VQACollator, instruction_pairs

    settings = settings or GenerativeDefaultSettings()
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / DEFAULT_LLAVA_NAME
    if is_built(folder):
        return folder
    vision_folder = Path(vision_model) if vision_model is not None else build_default_model(progress=progress)
    # timed from here: the embedded CLIP's own build (first use only) is `ran_peft.pretrain`'s
    started, started_cpu = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    clip = CLIPModel.from_pretrained(vision_folder)
    clip_processor = CLIPProcessor.from_pretrained(vision_folder)
    processor = offline_llava_processor(
        clip_processor.image_processor, patch_size=clip.config.vision_config.patch_size
    )
    model = llava_from_clip(clip, processor, settings)
    del clip

    image_size = model.config.vision_config.image_size
    rows = synthetic_medical_dataset(
        settings.image_rows,
        seed=settings.seed + 2000,
        image_size=image_size,
        task="finding",
        split_name="pretrain",
    )
    pixel_values = torch.cat(
        [
            processor.image_processor(images=rows[start : start + 256]["image"], return_tensors="pt")[
                "pixel_values"
            ]
            for start in range(0, len(rows), 256)
        ]
    )
    model.eval()
    features = vision_features(model, pixel_values)
    del pixel_values
    sequences = _Sequences(VQACollator(processor), image_token_count(model))
    stages = {
        "alignment": (
            settings.alignment_steps,
            lambda epoch: instruction_pairs(rows, seed=settings.seed + epoch, describe_only=True),
        ),
        "instruction": (
            settings.instruction_steps,
            lambda epoch: instruction_pairs(rows, seed=settings.seed + 1000 + epoch),
        ),
    }
    losses = {}
    for stage, (steps, make_pairs) in stages.items():
        losses[stage] = train_on_features(
            model,
            features,
            make_pairs,
            sequences,
            steps=steps,
            settings=settings,
            stage=stage,
            progress=progress,
        )
    model.eval()
    info = {
        "model": DEFAULT_LLAVA_NAME,
        "vision_model": str(vision_folder.name),
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": {stage: values[-1] if values else None for stage, values in losses.items()},
        "build_seconds": time.perf_counter() - started,
        "build_cpu_seconds": time.process_time() - started_cpu,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }
    return save_built_model(folder, model, processor, info)
