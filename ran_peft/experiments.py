"""Train-and-measure glue shared by the examples and the benchmarks: one adapter trained with the stock Trainer and
`RANCallback`, evaluated clean and under attack; and the baselines (LoRA, PGD-AT, TRADES) as RAN recipes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ran_peft.autoattack import evaluate_robust_accuracy
from ran_peft.callback import RANCallback
from ran_peft.config import RANConfig
from ran_peft.evaluation import evaluate_robustness
from ran_peft.pixels import PixelBox

EVAL_ATTACKS = ("autoattack", "autoattack-quick", "pgd")


@dataclass
class ExperimentSettings:
    """How long to train and how hard to attack at evaluation (always at least the training attack).

    `eval_attack`: `"autoattack"` (the reported number: AutoAttack's standard set for class predictions, PGD-100
    with 3 restarts for generative VLMs), `"autoattack-quick"` (the same attacks, fewer iterations, named as such),
    or `"pgd"` (the project's own PGD, `eval_attack_steps` steps and `eval_restarts` restarts: a training-time tool).
    """

    max_steps: int = 150
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 42
    eval_epsilons: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)
    eval_attack_steps: int = 20
    eval_restarts: int = 1
    eval_attack: str = "pgd"
    eval_batch_size: int = 64
    progress: bool = True
    logging_steps: int | None = None
    extra_training_arguments: dict[str, Any] = field(default_factory=dict)


def lora_equivalent(config: RANConfig) -> RANConfig:
    """The same adapter with every RAN term off: exactly plain LoRA training (a test checks it bit for bit)."""
    return replace(
        config,
        epsilon=0.0,
        text_epsilon=0.0,
        kl_weight=0.0,
        consistency_weight=0.0,
        covariance_weight=0.0,
        spectrum_weight=0.0,
        reference_kl_weight=0.0,
    )


def baseline_configs(config: RANConfig, attack_steps: int = 10) -> dict[str, RANConfig]:
    """`lora`, `pgd_at` (PGD-K adversarial training), `trades` (TRADES, K steps, beta 6) and `ran` (`config`).

    The baselines share the adapter, the budget and the warm-up of `config`; only the recipe differs.
    """
    peers = peer_configs(config, attack_steps=attack_steps)
    return {name: peers[name] for name in ("lora", "pgd_at", "trades", "ran")}


# The peers' attack steps during training, as used here (README, "The peers"): fast AT is single-step by design;
# TeCoA, PMG-AFT and FARE get a short PGD so that they sit near RAN's cost; PGD-AT and TRADES keep K steps.
PEER_SHORT_ATTACK_STEPS = 2


def clip_ran_config(pixel_box: PixelBox) -> RANConfig:
    """The default RAN recipe on the adapter the benchmarks and the noise study share for CLIP-style models: LoRA
    rank 8 (alpha 16) on the attention q/v projections, budgets converted through the model's `pixel_box`."""
    return RANConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        image_mean=list(pixel_box.mean),
        image_std=list(pixel_box.std),
    )


def peer_configs(config: RANConfig, attack_steps: int = 10) -> dict[str, RANConfig]:
    """The robust fine-tuning recipes a user would pick instead of RAN, each as a setting of `RANConfig`.

    All share the adapter, the budget and the warm-up of `config` (RAN's own recipe, returned as `ran`):

    - `lora`: no attack, no rectification (plain LoRA fine-tuning);
    - `fgsm_rs`: fast adversarial training (Wong et al. 2020): one FGSM step of 1.25 epsilon from a uniform random
      start, trained on the adversarial loss alone;
    - `tecoa`: TeCoA (Mao et al. 2023): the text-guided (image-to-prompt) cross-entropy on adversarial images only,
      PGD-2 during training;
    - `pmg_aft`: PMG-AFT (Wang et al. 2024): TeCoA's loss + KL(p_0(x+delta) || p(x+delta)) to the pre-trained
      (adapter-disabled) model + KL(p(x) || p(x+delta)), weights 1 and 1, PGD-2;
    - `fare`: FARE (Schlarmann et al. 2024): no task loss; the adversarial image embedding pulled to the pre-trained
      model's clean embedding, the attack maximising that distance, PGD-2;
    - `trades`: TRADES (Zhang et al. 2019): clean cross-entropy + 6 KL(p(x) || p(x+delta)), the attack on that KL,
      PGD-`attack_steps`;
    - `pgd_at`: PGD adversarial training (Madry et al. 2018) on the adversarial loss alone, PGD-`attack_steps`.
    """
    no_features = dict(
        consistency_weight=0.0, covariance_weight=0.0, spectrum_weight=0.0, reference_kl_weight=0.0
    )
    # Multi-step attacks start at a random point and take no free first step.
    multi_step = dict(step_size=None, free_start=False, random_start=True, **no_features)
    short = dict(multi_step, attack_steps=PEER_SHORT_ATTACK_STEPS)
    long = dict(multi_step, attack_steps=attack_steps)
    adversarial_only = dict(adversarial_weight=1.0, kl_weight=0.0, attack_loss="task", task_weight=1.0)
    return {
        "lora": lora_equivalent(config),
        "fgsm_rs": replace(
            config,
            **no_features,
            attack_steps=1,
            step_size=None,  # 1.25 epsilon for one step
            free_start=False,
            random_start=True,
            **adversarial_only,
        ),
        "tecoa": replace(config, **short, **adversarial_only),
        "pmg_aft": replace(
            config, **{**short, "reference_kl_weight": 1.0}, **{**adversarial_only, "kl_weight": 1.0}
        ),
        "fare": replace(
            config,
            **{**short, "consistency_weight": 1.0},
            task_weight=0.0,
            kl_weight=0.0,
            attack_loss="consistency",
        ),
        "trades": replace(
            config, **long, task_weight=1.0, adversarial_weight=0.0, kl_weight=6.0, attack_loss="kl"
        ),
        "pgd_at": replace(config, **long, **adversarial_only),
        "ran": config,
    }


def light_weight_configs(config: RANConfig) -> dict[str, RANConfig]:
    """RAN recipes that cost less than two passes a step (or spend the second pass better), each a setting of
    `RANConfig` on top of `config` (RAN's default):

    - `ran_every2`, `ran_every3`: the attack and the adversarial pass on every 2nd (3rd) step only (`attack_every`);
    - `ran_every3_kl3`: the same with the KL weight tripled, so that over three steps the rectification weighs what
      it weighs in the default;
    - `ran_every3_strong`: every 3rd step trains on the adversarial loss and the tripled KL alone
      (`adversarial_weight=1`, `kl_weight=3`); the steps between are clean;
    - `ran_boundary25`: the attack and the adversarial terms on the quarter of each batch nearest the decision
      boundary (`adversarial_fraction=0.25`, BulletTrain-style);
    - `ran_free2`, `ran_free3`, `ran_free4`: Free adversarial training with 2 (3, 4) replays of each batch and the KL
      to the clean replay's cached predictions (`free_replay`), one forward/backward per step;
    - `ran_carry`: each sample's perturbation carried across epochs (`carry_perturbations=True`, ATTA-style);
    - `ran_features`: the attack and the adversarial pass through the image tower alone, the adversarial image
      features pulled to the pre-trained model's clean ones (`adversarial_pass='image_features'`, FARE-style),
      on top of the clean task loss;
    - `ran_features_task`: the same adversarial pass, but the attack's one step is the free start's input gradient
      of the clean task loss (`attack_loss='task'`), so the perturbation aims at the answer and costs no pass of its
      own;
    - `ran_every3_eps8`, `ran_every4_eps8`: RAN's default on every 3rd (4th) step at twice the budget (8/255 for
      the default 4/255), spending the clean accuracy the skipped steps keep on robustness;
    - `ran_free2_kl2`: Free AT with 2 replays, the KL doubled so that per step it weighs what it weighs in the
      default (only every other step has one);
    - `ran_free2_eps6`, `ran_free2_eps8`: Free AT with 2 replays at 1.5 (2) times the budget.
    """
    features = replace(
        config,
        adversarial_pass="image_features",
        attack_loss="consistency",
        consistency_weight=1.0,
        kl_weight=0.0,
        adversarial_weight=0.0,
        free_start=False,
    )
    return {
        "ran_every2": replace(config, attack_every=2),
        "ran_every3": replace(config, attack_every=3),
        "ran_every3_kl3": replace(config, attack_every=3, kl_weight=3 * config.kl_weight),
        "ran_every3_strong": replace(
            config, attack_every=3, kl_weight=3 * config.kl_weight, adversarial_weight=1.0
        ),
        "ran_boundary25": replace(config, adversarial_fraction=0.25),
        "ran_free2": replace(config, free_replay=2),
        "ran_free3": replace(config, free_replay=3),
        "ran_free4": replace(config, free_replay=4),
        "ran_carry": replace(config, carry_perturbations=True),
        "ran_features": features,
        "ran_features_task": replace(features, attack_loss="task", free_start=True, attack_steps=1),
        "ran_every3_eps8": replace(config, attack_every=3, epsilon=2 * config.epsilon),
        "ran_every4_eps8": replace(config, attack_every=4, epsilon=2 * config.epsilon),
        "ran_free2_kl2": replace(config, free_replay=2, kl_weight=2 * config.kl_weight),
        "ran_free2_eps6": replace(config, free_replay=2, epsilon=1.5 * config.epsilon),
        "ran_free2_eps8": replace(config, free_replay=2, epsilon=2 * config.epsilon),
    }


def term_ablation_configs(config: RANConfig) -> dict[str, RANConfig]:
    """The default recipe `config` with each of its terms switched off in turn (the ablation behind the defaults):

    - `ran_no_adversarial_loss`: no cross-entropy on the adversarial examples (`adversarial_weight=0`);
    - `ran_no_kl`: no rectifying KL between clean and adversarial predictions (`kl_weight=0`);
    - `ran_no_free_start`: each step's attack starts from a fresh random point, not from the previous step's
      perturbation of the batch (`free_start=False`);
    - `ran_no_random_start`: the attack starts from the clean image (`random_start=False`).
    """
    return {
        "ran_no_adversarial_loss": replace(config, adversarial_weight=0.0),
        "ran_no_kl": replace(config, kl_weight=0.0),
        "ran_no_free_start": replace(config, free_start=False),
        "ran_no_random_start": replace(config, random_start=False),
    }


def _run_arguments(settings: ExperimentSettings, work_dir: str | Path) -> dict[str, Any]:
    """The training arguments the stock Trainer and TRL's SFTTrainer runs share: length, schedule, seeds, no saving."""
    return dict(
        output_dir=str(work_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, settings.max_steps // 10),
        logging_steps=settings.logging_steps or max(1, settings.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not settings.progress,
        dataloader_num_workers=0,
    )


def _timed_train(trainer: Any, timing: dict[str, float] | None) -> float:
    """`trainer.train()`, timed: returns the wall seconds; `timing`, when given, gets them and the CPU seconds."""
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds = time.perf_counter() - start
    if timing is not None:
        timing.update(wall_seconds=seconds, cpu_seconds=time.process_time() - cpu_start)
    return seconds


def train_adapter(
    model: torch.nn.Module,
    config: RANConfig,
    train_dataset: Any,
    collator: Any,
    image_processor: Any,
    settings: ExperimentSettings,
    work_dir: str | Path,
    *,
    class_text_inputs: Mapping[str, torch.Tensor] | None = None,
    callbacks: Sequence[Any] = (),
    timing: dict[str, float] | None = None,
):
    """Wrap `model` with the adapter of `config` and train it with the stock Trainer and `RANCallback`
    (and `callbacks`, e.g. a step timer).

    Returns `(trainer, peft_model, train_seconds)`. `timing`, when given, also gets `cpu_seconds`: the CPU time this
    process spent in `trainer.train()`, which other processes on a shared machine inflate far less than wall time.
    """
    from peft import get_peft_model
    from transformers import set_seed

    # The adapter's initial weights are drawn here, before the Trainer seeds anything: without this the global
    # random state of the moment (whatever ran before) decides them, and one --seed gives different adapters.
    set_seed(settings.seed)
    peft_model = get_peft_model(model, config)
    arguments = TrainingArguments(
        **_run_arguments(settings, work_dir),
        remove_unused_columns=False,  # CLIPModel.forward takes no `labels`; RAN's wrapper does
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        **settings.extra_training_arguments,
    )
    trainer = Trainer(
        model=peft_model,
        args=arguments,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=image_processor,
        callbacks=[RANCallback(class_text_inputs=class_text_inputs), *callbacks],
    )
    seconds = _timed_train(trainer, timing)
    return trainer, peft_model, seconds


def evaluate_adapter(
    model: torch.nn.Module,
    eval_dataset: Any,
    collator: Any,
    pixel_box: PixelBox,
    settings: ExperimentSettings,
    *,
    class_text_inputs: Mapping[str, torch.Tensor] | None = None,
    check_steps: bool = False,
) -> dict[str, Any]:
    """Clean and robust accuracy of `model` under `settings.eval_attack`, JSON-ready."""
    if settings.eval_attack not in EVAL_ATTACKS:
        raise ValueError(
            f"ExperimentSettings.eval_attack={settings.eval_attack!r} is not allowed: one of {EVAL_ATTACKS}."
        )
    loader = torch.utils.data.DataLoader(
        eval_dataset, batch_size=settings.eval_batch_size, collate_fn=collator
    )
    if settings.eval_attack != "pgd":
        report = evaluate_robust_accuracy(
            model,
            loader,
            pixel_box=pixel_box,
            epsilons=settings.eval_epsilons,
            quick=settings.eval_attack == "autoattack-quick",
            class_text_inputs=class_text_inputs,
            seed=settings.seed,
        )
        return report.to_dict()
    report = evaluate_robustness(
        model,
        loader,
        pixel_box=pixel_box,
        epsilons=settings.eval_epsilons,
        steps=settings.eval_attack_steps,
        restarts=settings.eval_restarts,
        class_text_inputs=class_text_inputs,
        seed=settings.seed,
        check_steps=check_steps,
    )
    return report.to_dict()


# ----------------------------------------------------------------------------------------------------------------
# Generative VLMs: fine-tuning through TRL's SFTTrainer (where users fine-tune them) and closed-set evaluation
# ----------------------------------------------------------------------------------------------------------------


def train_generative_adapter(
    model: torch.nn.Module,
    config: RANConfig,
    train_rows: Any,
    processor: Any,
    settings: ExperimentSettings,
    work_dir: str | Path,
    *,
    callbacks: Sequence[Any] = (),
    timing: dict[str, float] | None = None,
):
    """RAN (or a peer's recipe) fine-tuning of a generative VLM with TRL's `SFTTrainer`: `peft_config=config` and
    `callbacks=[RANCallback()]` are all that differs from LoRA fine-tuning. `train_rows` hold `image`, `question`
    and `answer`; the loss is on the answer (and the chat template's end of turn). Needs `ran-peft[trl]`.

    Returns `(trainer, peft_model, train_seconds)`; `timing`, when given, also gets `cpu_seconds` (as in
    `train_adapter`).
    """
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from ran_peft.data.vqa import sft_conversations

    on_gpu = torch.cuda.is_available()
    # SFTConfig turns gradient checkpointing on by default; it trades compute for memory, which only large models
    # need (pass `gradient_checkpointing=True` in `extra_training_arguments` for them). Off, the time ratios measure
    # the recipes, not the recomputation.
    extra = {"gradient_checkpointing": False, **settings.extra_training_arguments}
    arguments = SFTConfig(
        **_run_arguments(settings, work_dir),
        bf16=on_gpu
        and torch.cuda.is_bf16_supported(),  # SFTConfig's default (bf16) fails on a CPU without it
        max_length=None,  # never cut the image tokens
        **extra,
    )
    # SFTTrainer draws the adapter's initial weights before the Trainer seeds anything: seed them here, so that one
    # seed gives one adapter whatever ran before.
    set_seed(settings.seed)
    trainer = SFTTrainer(
        model,
        args=arguments,
        train_dataset=sft_conversations(train_rows),
        processing_class=processor,
        peft_config=config,
        callbacks=[RANCallback(), *callbacks],
    )
    seconds = _timed_train(trainer, timing)
    return trainer, trainer.model, seconds


def split_closed_questions(rows: Any, answers: Sequence[str]) -> tuple[Any, Any]:
    """`(closed, open)` rows: closed where the answer is one of `answers` (case and surrounding spaces aside; the
    answer is rewritten as `answers` spells it), open otherwise. Closed rows are sorted by question, so that batches
    hold whole groups of rows that share a prompt (what the AutoAttack view attacks together)."""
    spelling = {answer.strip().lower(): answer for answer in answers}
    keys = [str(answer).strip().lower() for answer in rows["answer"]]
    questions = rows["question"]
    closed_index = sorted(
        (index for index, key in enumerate(keys) if key in spelling), key=questions.__getitem__
    )
    open_index = [index for index, key in enumerate(keys) if key not in spelling]
    closed = rows.select(closed_index)
    closed = closed.map(lambda row: {"answer": spelling[str(row["answer"]).strip().lower()]})
    return closed, rows.select(open_index)


def evaluate_generative_adapter(
    model: torch.nn.Module,
    eval_rows: Any,
    collator: Any,
    pixel_box: PixelBox,
    settings: ExperimentSettings,
    *,
    answers: Sequence[str],
) -> dict[str, Any]:
    """Clean and robust accuracy of a generative VLM's answers, JSON-ready.

    Closed-set questions (answer in `answers`) are the headline: AutoAttack (or AutoAttack-quick) on the answers'
    first-token logits, each sample's worst case, and the greedy `generate` answer scored on the adversarial images
    found (`generation`). Open questions (any other answer) get PGD-100 with 3 restarts on the answer-token loss
    (PGD-50 with 2 restarts for `autoattack-quick`), teacher-forced exact match, under `open_questions`, labelled as
    such; they are the headline only when there is no closed question. `eval_attack="pgd"` scores every row with the
    project's PGD (the training tool).
    """
    from ran_peft.closed_set import ClosedSetAnswers

    if settings.eval_attack not in EVAL_ATTACKS:
        raise ValueError(
            f"ExperimentSettings.eval_attack={settings.eval_attack!r} is not allowed: one of {EVAL_ATTACKS}."
        )
    if settings.eval_attack == "pgd":
        return evaluate_adapter(model, eval_rows, collator, pixel_box, settings)
    closed, open_rows = split_closed_questions(eval_rows, answers)
    quick = settings.eval_attack == "autoattack-quick"
    record: dict[str, Any] = {}
    if len(closed):
        from ran_peft.autoattack import evaluate_autoattack

        loader = torch.utils.data.DataLoader(closed, batch_size=settings.eval_batch_size, collate_fn=collator)
        report = evaluate_autoattack(
            model,
            loader,
            pixel_box=pixel_box,
            epsilons=settings.eval_epsilons,
            version="quick" if quick else "standard",
            answers=ClosedSetAnswers.from_tokenizer(collator.tokenizer, answers),
            seed=settings.seed,
        )
        record = report.to_dict()
    if len(open_rows):
        loader = torch.utils.data.DataLoader(
            open_rows, batch_size=settings.eval_batch_size, collate_fn=collator
        )
        report = evaluate_robust_accuracy(
            model,
            loader,
            pixel_box=pixel_box,
            epsilons=settings.eval_epsilons,
            quick=quick,
            seed=settings.seed,
        ).to_dict()
        report["attack"]["name"] = report["attack"]["description"].split(",")[0]
        if record:
            record["open_questions"] = report
        else:
            record = report
    record["closed_rows"] = len(closed)
    record["open_rows"] = len(open_rows)
    return record
