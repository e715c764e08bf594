"""The paper's noise study in miniature, offline on CPU: how the share of adversarial noise in the upstream
(pre-training) data changes clean accuracy, robust accuracy and transfer after LoRA and RAN fine-tuning, over
several seeds, with intervals.

For each run seed (`--seeds`, default 0,1,2) and each noise ratio (default 0, 5, 10, 20, 30, 50 %):

1. noisy upstream data: the synthetic image-caption upstream set with `round(ratio * n)` rows attacked by
   `add_adversarial_noise` (default mode "both": targeted PGD on the image and a medical-term swap in the caption).
   The image attack's surrogate is a small CLIP pre-trained on the *clean* upstream data with the run seed.
   Pre-training on the clean data with the same steps and seed is exactly the ratio-0 upstream model, so that run
   is reused for ratio 0;
2. upstream model: a small CLIP pre-trained contrastively from scratch on the noisy data (same steps and run seed
   for every ratio, so within a seed the noise is the only difference);
3. downstream: LoRA and RAN adapters (the default `RANConfig`; LoRA is `lora_equivalent` of it) fine-tuned on the
   main task (`--task`, default "anatomy") and measured clean and under attack at each `--eval-epsilons` budget.
   The attack is `--eval-attack`: AutoAttack-quick by default (APGD-CE, APGD-T, FAB-T, Square with fewer
   iterations, per-sample worst case: `ran_peft.autoattack`), `autoattack` for the standard set, or `pgd`, the
   project's own PGD (`--eval-attack-steps`, `--eval-restarts`), a training tool and not the reported metric;
4. transfer to a second task (`--transfer-task`, default "modality"): a linear probe (multinomial logistic
   regression) on the frozen, L2-normalised image embeddings, for the upstream model and for the LoRA and RAN
   fine-tuned models. A probe is cheap (forward passes and a tiny convex fit, no fine-tuning) and measures what the
   paper's "transferability" is about: how much of a new task the learned features already hold.

A run seed redraws everything a seed should: the surrogate and the upstream pre-training, which rows get noise and
the noise itself, the adapters' initial weights, the training order and the attack's random starts. The synthetic
datasets (upstream, train, test, transfer) are fixed by `--data-seed`, so the seeds share their test rows.
`--seed N` is the single-seed study as it was before `--seeds` existed (the same as `--seeds N --data-seed N`).

Per ratio and method the report holds every seed's numbers, their mean with a 95 % t-interval over the seeds and
the binomial standard error of one accuracy on the test rows; the finding calls a change real only where the
interval of its per-seed difference excludes zero and the change exceeds the binomial margin, and "not
distinguishable from noise" otherwise.

Writes a JSON report (`--out`) with every number and the time of each phase of each seed (rewritten after every
seed, so an interrupted run leaves whole seeds behind), and a PNG plot beside it; prints a summary table and the
finding. `--merge a.json,b.json --out c.json` joins runs of different seeds (e.g. one process per core) into one
report, as one run over all their seeds would give. Nothing is cached: scratch files go to a temporary folder (or
`--work-dir`). The synthetic data and small models stand in for real ones: the study shows the method, and its
numbers say nothing about real medical VLMs.

    python examples/noise_study.py --quick          # one seed, tiny sizes: 33 s measured on a busy 2-core machine
    python examples/noise_study.py --quick --seeds 0,1                # with intervals: 58 s measured, same machine
    python examples/noise_study.py --seeds 0,1 --out s01.json &       # the full study, one process per core ...
    python examples/noise_study.py --seeds 2 --out s2.json & wait
    python examples/noise_study.py --merge s01.json,s2.json --out noise_study.json   # ... joined (not timed yet)
    python examples/noise_study.py --ratios 0,0.1,0.5 --eval-attack pgd --out runs/noise.json

It runs on one thread (`--threads`): on a shared machine two threads spin-waiting for each other are several times
slower than one. To use two cores, run the seeds in one process per core and `--merge` the reports.
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of non-4-bit runs)

# isort: split

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ran_peft.evaluation import parse_epsilon
from ran_peft.experiments import EVAL_ATTACKS

logger = logging.getLogger("ran_peft.noise_study")

METHODS = ("lora", "ran")
LABELS = {"lora": "LoRA", "ran": "RAN"}


@dataclass
class StudySettings:
    """Every size and knob of the study; the defaults are the full study, `QUICK` the smoke-sized one."""

    ratios: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    noise_mode: str = "both"
    noise_epsilon: float = 8 / 255
    noise_steps: int = 10
    image_size: int = 32
    upstream_size: int = 1024
    pretrain_steps: int = 120
    pretrain_batch_size: int = 64
    task: str = "anatomy"
    transfer_task: str = "modality"
    train_size: int = 512
    eval_size: int = 160
    finetune_steps: int = 40
    batch_size: int = 32
    learning_rate: float = 2e-3
    eval_epsilons: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)
    eval_attack: str = "autoattack-quick"
    eval_attack_steps: int = 10
    eval_restarts: int = 1
    transfer_train_size: int = 384
    transfer_eval_size: int = 160
    data_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    progress: bool = True


# A smoke run at about the time of the single-seed PGD-10 quick run it replaces: AutoAttack-quick costs about six
# times PGD-10 per budget, so it scores one budget on 32 rows, after shorter pre-training, for one seed. A second
# seed doubles the time; `--quick --seeds 0,1` shows the intervals.
QUICK = dict(
    ratios=(0.0, 0.2),
    image_size=32,
    upstream_size=128,
    pretrain_steps=24,
    pretrain_batch_size=32,
    train_size=96,
    eval_size=32,
    finetune_steps=10,
    batch_size=16,
    eval_epsilons=(4 / 255,),
    transfer_train_size=96,
    transfer_eval_size=48,
    seeds=(0,),
)

HELP = {
    "eval_attack": "attack of the reported robust accuracy: autoattack (the standard set), autoattack-quick (the "
    "same attacks, fewer iterations) or pgd (the project's training-tool PGD, not the reported metric)",
    "eval_attack_steps": "PGD steps with --eval-attack pgd",
    "eval_restarts": "PGD restarts with --eval-attack pgd",
    "data_seed": "seed of the synthetic datasets (upstream, train, test, transfer): the same for every run seed",
    "seeds": "comma-separated run seeds; each redraws the surrogate and upstream pre-training, the noise, the "
    "adapters' init, the training order and the attack's random starts",
}

# Settings that may differ between runs --merge joins (they change neither the data nor a number).
MERGE_FREE_SETTINGS = ("seeds", "threads", "progress")


class UsageError(ValueError):
    """A bad argument: reported as one line, before anything runs."""


def check_settings(settings: StudySettings) -> None:
    from ran_peft.data import SYNTHETIC_TASKS
    from ran_peft.noise import NOISE_MODES

    if not settings.ratios or any(not 0.0 <= r <= 1.0 for r in settings.ratios):
        raise UsageError(f"--ratios={list(settings.ratios)}: give one or more ratios in [0, 1].")
    if len(set(settings.ratios)) != len(settings.ratios):
        raise UsageError(f"--ratios={list(settings.ratios)} repeats a ratio.")
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise UsageError(f"--seeds={list(settings.seeds)}: give one or more seeds, each once.")
    if settings.noise_mode not in NOISE_MODES:
        raise UsageError(f"--noise-mode={settings.noise_mode!r} must be one of {NOISE_MODES}.")
    for name in ("task", "transfer_task"):
        if getattr(settings, name) not in SYNTHETIC_TASKS:
            raise UsageError(
                f"--{name.replace('_', '-')}={getattr(settings, name)!r} must be one of {sorted(SYNTHETIC_TASKS)}."
            )
    if settings.eval_attack not in EVAL_ATTACKS:
        raise UsageError(f"--eval-attack={settings.eval_attack!r} must be one of {', '.join(EVAL_ATTACKS)}.")
    classes = len(SYNTHETIC_TASKS[settings.task])
    if settings.eval_attack != "pgd" and classes < 4:
        raise UsageError(
            f"--task={settings.task!r} has {classes} classes; AutoAttack's targeted attacks need at least 4: pick "
            "another task or --eval-attack pgd."
        )
    if settings.image_size < 16 or settings.image_size % 8:
        raise UsageError(
            f"--image-size={settings.image_size} must be a multiple of 8 (the patch size), >= 16."
        )
    if settings.upstream_size < 2:
        raise UsageError(
            f"--upstream-size={settings.upstream_size} must be >= 2 (the image attack needs two rows)."
        )
    for name in (
        "pretrain_steps",
        "pretrain_batch_size",
        "train_size",
        "eval_size",
        "finetune_steps",
        "batch_size",
        "eval_attack_steps",
        "eval_restarts",
        "transfer_train_size",
        "transfer_eval_size",
        "threads",
    ):
        if getattr(settings, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(settings, name)} must be >= 1.")
    if settings.pretrain_batch_size > settings.upstream_size:
        # pretrain_clip drops the last partial batch: a batch larger than the data would never yield one.
        raise UsageError(
            f"--pretrain-batch-size={settings.pretrain_batch_size} is larger than --upstream-size="
            f"{settings.upstream_size}."
        )
    if not 0.0 <= settings.noise_epsilon <= 1.0 or settings.noise_steps < 0:
        raise UsageError("--noise-epsilon must be in [0, 1] and --noise-steps >= 0.")
    if not settings.eval_epsilons or any(not 0.0 < e <= 1.0 for e in settings.eval_epsilons):
        raise UsageError(f"--eval-epsilons={list(settings.eval_epsilons)}: every budget must be in (0, 1].")


def attack_label(settings: Mapping[str, Any] | StudySettings) -> str:
    """The evaluation attack's name, as it stands beside every robust figure."""
    if isinstance(settings, StudySettings):
        settings = asdict(settings)
    attack = settings["eval_attack"]
    if attack == "autoattack":
        return "AutoAttack"
    if attack == "autoattack-quick":
        return "AutoAttack-quick"
    restarts = settings["eval_restarts"]
    return (
        f"PGD-{settings['eval_attack_steps']}{f' x{restarts}' if restarts > 1 else ''} (training-tool attack)"
    )


def describe_attack(settings: StudySettings, classes: int) -> str:
    from ran_peft.autoattack import AUTOATTACK_SETTINGS

    if settings.eval_attack == "pgd":
        return (
            f"the project's PGD-{settings.eval_attack_steps} with {settings.eval_restarts} restart(s), L-inf, per "
            "budget: a training-time tool, weaker than AutoAttack; not the reported metric"
        )
    version = "quick" if settings.eval_attack == "autoattack-quick" else "standard"
    return AUTOATTACK_SETTINGS[version].describe(classes) + ", per budget"


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """What every seed shares: the processor, the datasets (fixed by the data seed), prompts and adapter configs."""

    processor: Any
    upstream: Any
    train: Any
    evaluation: Any
    transfer_train: Any
    transfer_eval: Any
    collator: Any
    class_text_inputs: dict[str, torch.Tensor]
    pixel_box: Any
    configs: dict[str, Any]

    @classmethod
    def build(cls, settings: StudySettings) -> StudyData:
        from ran_peft import PixelBox
        from ran_peft.data import ImageTextCollator, synthetic_medical_dataset, tokenize_class_prompts
        from ran_peft.experiments import clip_ran_config, lora_equivalent
        from ran_peft.pretrain import offline_processor

        processor = offline_processor(image_size=settings.image_size)

        def rows(n: int, split: str, task: str | None = None) -> Any:
            extra = {} if task is None else {"task": task}
            return synthetic_medical_dataset(
                n, seed=settings.data_seed, image_size=settings.image_size, split_name=split, **extra
            )

        train = rows(settings.train_size, "train", settings.task)
        pixel_box = PixelBox.from_processor(processor)
        ran_config = clip_ran_config(pixel_box)
        return cls(
            processor=processor,
            upstream=rows(settings.upstream_size, "upstream"),
            train=train,
            evaluation=rows(settings.eval_size, "test", settings.task),
            transfer_train=rows(settings.transfer_train_size, "transfer_train", settings.transfer_task),
            transfer_eval=rows(settings.transfer_eval_size, "transfer_test", settings.transfer_task),
            collator=ImageTextCollator(processor.image_processor, processor.tokenizer, mode="classification"),
            class_text_inputs=tokenize_class_prompts(processor.tokenizer, train.features["label"].names),
            pixel_box=pixel_box,
            configs={"lora": lora_equivalent(ran_config), "ran": ran_config},
        )

    def transfer_accuracy(self, model: torch.nn.Module) -> float:
        from ran_peft.representation import image_features, linear_probe_accuracy

        def features(rows: Any) -> torch.Tensor:
            return image_features(
                model, torch.utils.data.DataLoader(rows, batch_size=64, collate_fn=self.collator)
            )

        return linear_probe_accuracy(
            features(self.transfer_train),
            torch.tensor(self.transfer_train["label"]),
            features(self.transfer_eval),
            torch.tensor(self.transfer_eval["label"]),
        )


def run_seed(
    data: StudyData,
    settings: StudySettings,
    seed: int,
    work: Path,
    on_ratio: Callable[[dict], None] | None = None,
) -> dict:
    """Every ratio and method for one run seed: `{"seed", "results": [one entry per ratio], "timings_seconds"}`.

    `on_ratio(run)` is called with the run so far after each ratio (for partial reports).
    """
    from ran_peft.experiments import ExperimentSettings, evaluate_adapter, train_adapter
    from ran_peft.noise import SurrogateVLM, add_adversarial_noise
    from ran_peft.pretrain import pretrain_clip

    started = time.perf_counter()
    timings: dict[str, Any] = {}
    run: dict[str, Any] = {"seed": seed, "results": [], "timings_seconds": timings}
    experiment = ExperimentSettings(
        max_steps=settings.finetune_steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=seed,
        eval_epsilons=settings.eval_epsilons,
        eval_attack=settings.eval_attack,
        eval_attack_steps=settings.eval_attack_steps,
        eval_restarts=settings.eval_restarts,
        progress=settings.progress,
        logging_steps=settings.finetune_steps,  # one log line per run keeps the console readable
    )
    pretrain = dict(
        steps=settings.pretrain_steps,
        batch_size=settings.pretrain_batch_size,
        seed=seed,
        image_size=settings.image_size,
        progress=settings.progress,
    )
    processor = data.processor
    with timed(timings, "surrogate_pretraining"):
        surrogate_model = pretrain_clip(data.upstream, processor, **pretrain)
    surrogate = SurrogateVLM(surrogate_model, processor.image_processor, processor.tokenizer)

    per_ratio: dict[str, dict[str, float]] = {}
    timings["per_ratio"] = per_ratio
    for ratio in settings.ratios:
        phase: dict[str, float] = {}
        per_ratio[f"{ratio:g}"] = phase
        print(f"\n=== seed {seed}, noise ratio {100 * ratio:g}% ===", flush=True)
        with timed(phase, "noise"):
            noisy = add_adversarial_noise(
                data.upstream,
                ratio,
                mode=settings.noise_mode,
                seed=seed,
                surrogate=surrogate,
                epsilon=settings.noise_epsilon,
                steps=settings.noise_steps,
            )
        noisy_rows = int(sum(noisy["noisy"]))
        with timed(phase, "pretraining"):
            # Same data, steps and seed as the surrogate's run: reuse it rather than train it twice.
            upstream_model = (
                surrogate_model if noisy_rows == 0 else pretrain_clip(noisy, processor, **pretrain)
            )
        with timed(phase, "transfer_upstream"):
            transfer = {"task": settings.transfer_task, "upstream": data.transfer_accuracy(upstream_model)}
        entry: dict[str, Any] = {
            "ratio": ratio,
            "noisy_rows": noisy_rows,
            "upstream_rows": len(noisy),
            "noisy_fraction": noisy_rows / len(noisy),
        }
        for method in METHODS:
            # get_peft_model injects the adapter in place: each run gets its own copy of the upstream model.
            base = copy.deepcopy(upstream_model)
            with timed(phase, f"{method}_train"):
                trainer, model, _ = train_adapter(
                    base,
                    data.configs[method],
                    data.train,
                    data.collator,
                    processor.image_processor,
                    experiment,
                    work / f"{method}-{ratio:g}",
                    class_text_inputs=data.class_text_inputs,
                )
            with timed(phase, f"{method}_eval"):
                measured = evaluate_adapter(
                    model,
                    data.evaluation,
                    data.collator,
                    data.pixel_box,
                    experiment,
                    class_text_inputs=data.class_text_inputs,
                )
            measured["train_seconds"] = phase[f"{method}_train"]
            measured["train_loss"] = trainer.state.log_history[-1].get("train_loss")
            entry[method] = measured
            with timed(phase, f"transfer_{method}"):
                transfer[method] = data.transfer_accuracy(model)
            del model, base, trainer
        entry["transfer"] = transfer
        run["results"].append(entry)
        print(ratio_line(entry, attack_label(settings)), flush=True)
        timings["total"] = round(time.perf_counter() - started, 3)
        if on_ratio is not None:
            on_ratio(run)
    timings["total"] = round(time.perf_counter() - started, 3)
    return run


def run_study(
    settings: StudySettings, out: str | os.PathLike, *, work_dir: str | os.PathLike | None = None
) -> dict:
    """Run the whole study, seed by seed; write `out` (JSON, after every seed) and its PNG plot; return the report."""
    import datasets

    from ran_peft.data import SYNTHETIC_TASKS

    check_settings(settings)
    torch.set_num_threads(settings.threads)
    bars_were_on = datasets.is_progress_bar_enabled()
    if not settings.progress:
        datasets.disable_progress_bars()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    own_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ran-noise-study-")) if own_work_dir else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, Any] = {}
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "design": {
            "seeds": "each run seed redraws the surrogate and upstream pre-training, the noisy rows and their noise, "
            "the adapters' initial weights, the training order and the attack's random starts; the synthetic "
            f"datasets are fixed by data seed {settings.data_seed}, so every seed is scored on the same test rows",
            "surrogate": "a small CLIP pre-trained on the clean upstream data (same steps and run seed as every "
            "upstream model of that seed); it is also the ratio-0 upstream model",
            "upstream_model": "small CLIP pre-trained contrastively from scratch on the (noisy) upstream data",
            "methods": {
                "lora": "lora_equivalent(RANConfig(...)): every RAN term off",
                "ran": "RANConfig defaults",
            },
            "attack": attack_label(settings),
            "robust_accuracy": describe_attack(settings, len(SYNTHETIC_TASKS[settings.task])),
            "transfer": f"linear-probe accuracy on task {settings.transfer_task!r} from frozen, L2-normalised image "
            "embeddings (multinomial logistic regression, L-BFGS): of the upstream model and of the LoRA and RAN "
            f"models fine-tuned on {settings.task!r}",
            "intervals": INTERVALS,
        },
        "runs": {},
        "summary": None,
        "timings_seconds": timings,
    }
    try:
        with timed(timings, "data"):
            data = StudyData.build(settings)
        report["design"]["ran_recipe"] = data.configs["ran"].recipe_dict()
        for index, seed in enumerate(settings.seeds, 1):
            print(f"\n##### seed {seed} ({index} of {len(settings.seeds)}) #####", flush=True)

            def partial(run: dict) -> None:
                report["unfinished_seed"] = run  # not in "runs" or the summary until every ratio is done
                _write_json(report, out)

            run = run_seed(data, settings, seed, work / f"seed-{seed}", on_ratio=partial)
            report.pop("unfinished_seed", None)
            report["runs"][str(seed)] = run
            report["summary"] = summarise(report)
            _write_json(report, out)  # an interrupted study still leaves its whole seeds behind
        with timed(timings, "plot"):
            finish(report, out)
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    timings["total"] = round(time.perf_counter() - started, 3)
    _write_json(report, out)
    print_report(report, out)
    return report


def finish(report: dict, out: Path) -> None:
    """The finding and the plot of a report whose runs are all in."""
    report["summary"] = summarise(report)
    report["finding"] = finding(report)
    plot(report, out.with_suffix(".png"))


def print_report(report: dict, out: Path) -> None:
    print()
    print(table(report))
    print()
    print(report["finding"])
    print(f"\nreport: {out}  plot: {out.with_suffix('.png')}  ({report['timings_seconds']['total']:.0f} s)")


def _write_json(report: dict, path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(report, indent=2))
    os.replace(staging, path)


def merge(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """One report from several runs of this script over different seeds (e.g. one process per core): their whole
    seeds joined, the summary, finding and plot recomputed. The runs must share every setting but the seeds (and
    the thread count); a seed a run did not finish is left out."""
    out = Path(out)
    if not paths:
        raise UsageError("--merge needs one or more report files.")
    started = time.perf_counter()
    parts = []
    for path in paths:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:
            raise UsageError(f"--merge: cannot read {str(path)!r}: {error}") from error
    first = parts[0]
    if "runs" not in first:
        raise UsageError(f"--merge: {str(paths[0])!r} is not a report of this script (no 'runs').")

    def comparable(settings: dict) -> dict:
        return {key: value for key, value in settings.items() if key not in MERGE_FREE_SETTINGS}

    runs: dict[str, Any] = {}
    merged_from = []
    for path, part in zip(paths, parts, strict=True):
        if "runs" not in part:
            raise UsageError(f"--merge: {str(path)!r} is not a report of this script (no 'runs').")
        differ = sorted(
            key
            for key in set(comparable(first["settings"])) | set(comparable(part["settings"]))
            if first["settings"].get(key) != part["settings"].get(key)
        )
        if differ:
            raise UsageError(
                f"--merge: {str(path)!r} differs from {str(paths[0])!r} in {', '.join(differ)}: only runs of the "
                "same study over different seeds can be joined."
            )
        for seed, run in part["runs"].items():
            if seed in runs:
                raise UsageError(f"--merge: seed {seed} is in more than one file.")
            runs[seed] = run
        unfinished = part.get("unfinished_seed")
        merged_from.append(
            {
                "file": str(path),
                "seeds": [int(seed) for seed in part["runs"]],
                "total_seconds": part.get("timings_seconds", {}).get("total"),
                **({"left_out_unfinished_seed": unfinished["seed"]} if unfinished else {}),
            }
        )
    if not runs:
        raise UsageError("--merge: the files hold no finished seed.")
    seeds = sorted(runs, key=int)
    timings: dict[str, Any] = {}
    report = {
        "settings": {**first["settings"], "seeds": [int(seed) for seed in seeds]},
        "design": first["design"],
        "runs": {seed: runs[seed] for seed in seeds},
        "summary": None,
        "merged_from": merged_from,
        "timings_seconds": timings,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with timed(timings, "plot"):
        finish(report, out)
    timings["total"] = round(time.perf_counter() - started, 3)
    _write_json(report, out)
    print_report(report, out)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Statistics over seeds
# ----------------------------------------------------------------------------------------------------------------

INTERVALS = (
    "mean over run seeds with a 95% t-interval (mean +- t(0.975, n-1) * sd / sqrt(n), none for one seed); "
    "binomial_se: sqrt(p (1 - p) / rows), the sampling error of one accuracy on the test rows, which the seeds "
    "share; a change (between noise ratios, or RAN - LoRA) counts only if the t-interval of its per-seed "
    "(paired) difference excludes zero and it exceeds 1.96 binomial standard errors of a difference"
)

# Two-sided 95 % quantiles of Student's t for 1 to 30 degrees of freedom.
_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z_975 = 1.959963984540054


def t_quantile_975(degrees_of_freedom: int) -> float:
    """The 97.5 % quantile of Student's t: a table to 30 degrees of freedom, then the Cornish-Fisher expansion
    (within 1e-5 of the exact value beyond 30)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom={degrees_of_freedom} must be >= 1.")
    if degrees_of_freedom <= len(_T_975):
        return _T_975[degrees_of_freedom - 1]
    z, n = _Z_975, degrees_of_freedom
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
    )


def binomial_se(accuracy: float, rows: int) -> float:
    """Standard error of an accuracy measured on `rows` samples (p kept off 0 and 1 by one sample)."""
    p = min(max(accuracy, 1 / rows), 1 - 1 / rows)
    return math.sqrt(p * (1 - p) / rows)


def seed_stats(per_seed: Mapping[str, float], rows: int | None = None) -> dict[str, Any]:
    """Per-seed values, their mean, sample standard deviation and 95 % t-interval over seeds; with `rows`, the
    binomial standard error of one accuracy at the mean."""
    values = list(per_seed.values())
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    half = t_quantile_975(len(values) - 1) * std / math.sqrt(len(values)) if len(values) > 1 else None
    stats: dict[str, Any] = {
        "per_seed": dict(per_seed),
        "mean": mean,
        "std": std,
        "n": len(values),
        "half_width_95": half,
        "t_interval_95": None if half is None else [mean - half, mean + half],
    }
    if rows:
        stats["binomial_se"] = binomial_se(mean, rows)
    return stats


def difference_stats(later: Mapping[str, float], earlier: Mapping[str, float], rows: int) -> dict[str, Any]:
    """`later - earlier` seed by seed (paired: same seed, same test rows), with its interval over seeds, the binomial
    margin of a difference of two accuracies on `rows` samples, and whether the change is distinguishable from
    noise (the interval excludes zero and the change exceeds the margin)."""
    if set(later) != set(earlier):
        raise ValueError(f"the seeds differ: {sorted(later)} vs {sorted(earlier)}.")
    stats = seed_stats({seed: later[seed] - earlier[seed] for seed in later})
    se = math.hypot(
        binomial_se(statistics.fmean(later.values()), rows),
        binomial_se(statistics.fmean(earlier.values()), rows),
    )
    stats["binomial_se"] = se
    stats["binomial_margin_95"] = _Z_975 * se
    interval = stats["t_interval_95"]
    stats["distinguishable"] = bool(
        interval is not None
        and (interval[0] > 0 or interval[1] < 0)
        and abs(stats["mean"]) > stats["binomial_margin_95"]
    )
    return stats


def mean_robust(run: dict) -> float:
    values = list(run["robust_accuracy"].values())
    return sum(values) / len(values)


def _by_ratio(run: dict) -> dict[float, dict]:
    return {entry["ratio"]: entry for entry in run["results"]}


def summarise(report: dict) -> dict[str, Any]:
    """Per ratio and method: every seed's numbers with their mean and intervals; RAN - LoRA per ratio and averaged
    over the ratios; the curves over noise and their verdicts. Only the finished seeds in `report["runs"]` count."""
    runs = [report["runs"][seed] for seed in sorted(report["runs"], key=int)]
    if not runs:
        return {}
    seeds = [str(run["seed"]) for run in runs]
    by_ratio = {str(run["seed"]): _by_ratio(run) for run in runs}
    ratios = sorted(by_ratio[seeds[0]])
    for seed in seeds:
        if sorted(by_ratio[seed]) != ratios:
            raise ValueError(
                f"seed {seed} has ratios {sorted(by_ratio[seed])}, seed {seeds[0]} has {ratios}."
            )
    rows = by_ratio[seeds[0]][ratios[0]]["lora"]["num_samples"]
    transfer_rows = report["settings"]["transfer_eval_size"]
    budgets = list(by_ratio[seeds[0]][ratios[0]]["lora"]["robust_accuracy"])

    def per_seed(ratio: float, read: Callable[[dict], float]) -> dict[str, float]:
        return {seed: read(by_ratio[seed][ratio]) for seed in seeds}

    results = []
    for ratio in ratios:
        first = by_ratio[seeds[0]][ratio]
        entry: dict[str, Any] = {"ratio": ratio, "noisy_rows": first["noisy_rows"]}
        for method in METHODS:
            entry[method] = {
                "clean_accuracy": seed_stats(
                    per_seed(ratio, lambda e, m=method: e[m]["clean_accuracy"]), rows
                ),
                "robust_accuracy": {
                    budget: seed_stats(
                        per_seed(ratio, lambda e, m=method, b=budget: e[m]["robust_accuracy"][b]), rows
                    )
                    for budget in budgets
                },
                "robust_mean": seed_stats(per_seed(ratio, lambda e, m=method: mean_robust(e[m])), rows),
                "passed_checks": all(
                    by_ratio[seed][ratio][method].get("passed_checks", True) for seed in seeds
                ),
            }
        entry["transfer"] = {
            "task": first["transfer"]["task"],
            **{
                name: seed_stats(per_seed(ratio, lambda e, n=name: e["transfer"][n]), transfer_rows)
                for name in ("upstream", *METHODS)
            },
        }
        entry["ran_minus_lora"] = {
            "clean_accuracy": difference_stats(
                entry["ran"]["clean_accuracy"]["per_seed"], entry["lora"]["clean_accuracy"]["per_seed"], rows
            ),
            "robust_mean": difference_stats(
                entry["ran"]["robust_mean"]["per_seed"], entry["lora"]["robust_mean"]["per_seed"], rows
            ),
        }
        results.append(entry)

    def averaged(read: Callable[[dict], float]) -> dict[str, float]:
        return {seed: statistics.fmean(read(by_ratio[seed][ratio]) for ratio in ratios) for seed in seeds}

    gaps = {
        name: difference_stats(
            averaged(lambda e, r=read: r(e["ran"])), averaged(lambda e, r=read: r(e["lora"])), rows
        )
        for name, read in (
            ("clean_accuracy", lambda run: run["clean_accuracy"]),
            ("robust_mean", mean_robust),
        )
    }
    curves = {
        f"{method}_robust_mean": curve(
            ratios, [entry[method]["robust_mean"]["per_seed"] for entry in results], rows
        )
        for method in METHODS
    }
    curves["transfer_upstream"] = curve(
        ratios, [entry["transfer"]["upstream"]["per_seed"] for entry in results], transfer_rows
    )
    failed = [
        f"{LABELS[method]} at {100 * ratio:g}% seed {seed}"
        for ratio in ratios
        for method in METHODS
        for seed in seeds
        if by_ratio[seed][ratio][method].get("passed_checks") is False
    ]
    return {
        "seeds": [int(seed) for seed in seeds],
        "attack": attack_label(report["settings"]),
        "eval_rows": rows,
        "transfer_eval_rows": transfer_rows,
        "intervals": INTERVALS,
        "results": results,
        "ran_minus_lora_over_ratios": gaps,
        "curves": curves,
        "failed_masking_checks": failed,
    }


def curve(ratios: Sequence[float], values: Sequence[Mapping[str, float]], rows: int) -> dict[str, Any]:
    """An accuracy-vs-noise curve (per-seed values at each ratio) and its verdict, from paired differences:

    "peak" (a distinguishable rise from clean data to the best ratio, then a distinguishable fall to the last),
    "rise", "fall", or "noise" (no change distinguishable from noise). The best ratio is picked from the same means,
    so a marginal rise is optimistic."""
    means = [statistics.fmean(v.values()) for v in values]
    best = max(range(len(means)), key=lambda i: (means[i], -i))
    last = len(means) - 1
    record: dict[str, Any] = {"ratios": list(ratios), "means": means, "best_ratio": ratios[best]}
    if len(means) < 2:
        record["verdict"] = "noise"
        return record
    to_best = difference_stats(values[best], values[0], rows) if best > 0 else None
    best_to_last = difference_stats(values[last], values[best], rows) if best < last else None
    to_last = difference_stats(values[last], values[0], rows)
    record.update(clean_to_best=to_best, best_to_last=best_to_last, clean_to_last=to_last)
    rises = to_best is not None and to_best["distinguishable"] and to_best["mean"] > 0
    falls_after = best_to_last is not None and best_to_last["distinguishable"] and best_to_last["mean"] < 0
    if rises and falls_after:
        record.update(verdict="peak", change=to_best, at=ratios[best])
    elif rises:
        record.update(verdict="rise", change=to_best, at=ratios[best])
    elif to_last["distinguishable"]:
        record.update(verdict="fall" if to_last["mean"] < 0 else "rise", change=to_last, at=ratios[last])
    else:
        largest = max((to_best, to_last), key=lambda stats: -1.0 if stats is None else abs(stats["mean"]))
        record.update(
            verdict="noise", change=largest, at=ratios[best] if largest is to_best else ratios[last]
        )
    return record


# ----------------------------------------------------------------------------------------------------------------
# Reporting: table, plot and the finding
# ----------------------------------------------------------------------------------------------------------------


def ratio_line(entry: dict, attack: str) -> str:
    parts = [f"ratio {100 * entry['ratio']:g}% ({entry['noisy_rows']} noisy rows):"]
    for method in METHODS:
        run = entry[method]
        parts.append(
            f"{method} clean {100 * run['clean_accuracy']:.1f} robust(mean, {attack}) {100 * mean_robust(run):.1f};"
        )
    transfer = entry["transfer"]
    parts.append(
        f"transfer ({transfer['task']}) upstream {100 * transfer['upstream']:.1f} "
        f"lora {100 * transfer['lora']:.1f} ran {100 * transfer['ran']:.1f}"
    )
    return " ".join(parts)


def _points(stats: dict) -> str:
    """Mean ± the 95 % t half-width over seeds, in points (the mean alone for one seed)."""
    if stats["half_width_95"] is None:
        return f"{100 * stats['mean']:.1f}"
    return f"{100 * stats['mean']:.1f}±{100 * stats['half_width_95']:.1f}"


def _interval(stats: dict) -> str:
    interval = stats["t_interval_95"]
    if interval is None:
        return "no interval from one seed"
    return f"95% interval {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f}"


def table(report: dict) -> str:
    summary = report["summary"]
    results = summary["results"]
    seeds = summary["seeds"]
    budgets = list(results[0]["lora"]["robust_accuracy"])
    width = 12
    header = f"{'noise':>6} {'method':<6} {'clean':>{width}} "
    header += " ".join(f"{'@' + b:>{width}}" for b in budgets) + f" {'transfer':>{width}}"
    lines = [
        f"robust accuracy under {summary['attack']}; "
        + (
            f"mean±95% t-interval half-width over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1
            else f"seed {seeds[0]} alone (one seed: no interval)"
        ),
        header,
        "-" * len(header),
    ]
    per_seed_lines = [
        "per seed (" + " / ".join(map(str, seeds)) + "):",
        f"{'noise':>6} {'method':<6} {'clean':>{width + 6}} "
        + " ".join(f"{'@' + b:>{width + 6}}" for b in budgets)
        + f" {'transfer':>{width + 6}}",
    ]

    def each(stats: dict) -> str:
        return "/".join(f"{100 * stats['per_seed'][str(seed)]:.1f}" for seed in seeds)

    for entry in results:
        noise = f"{100 * entry['ratio']:5g}%"
        for method in METHODS:
            run = entry[method]
            cells = " ".join(f"{_points(run['robust_accuracy'][b]):>{width}}" for b in budgets)
            lines.append(
                f"{noise} {method:<6} {_points(run['clean_accuracy']):>{width}} {cells} "
                f"{_points(entry['transfer'][method]):>{width}}"
            )
            cells = " ".join(f"{each(run['robust_accuracy'][b]):>{width + 6}}" for b in budgets)
            per_seed_lines.append(
                f"{noise} {method:<6} {each(run['clean_accuracy']):>{width + 6}} {cells} "
                f"{each(entry['transfer'][method]):>{width + 6}}"
            )
        label = "(upstream probe)"
        lines.append(
            f"{noise} {label:<{6 + (width + 1) * (len(budgets) + 1)}} {_points(entry['transfer']['upstream']):>{width}}"
        )
        per_seed_lines.append(
            f"{noise} {label:<{6 + (width + 7) * (len(budgets) + 1)}} "
            f"{each(entry['transfer']['upstream']):>{width + 6}}"
        )
    rows = summary["eval_rows"]
    se = binomial_se(results[0]["lora"]["clean_accuracy"]["mean"], rows)
    lines.append(
        f"accuracy in %; robust = {summary['attack']} at each budget; transfer = linear probe on "
        f"{results[0]['transfer']['task']!r} (frozen features); one accuracy on {rows} test rows has a binomial "
        f"standard error of about {100 * se:.1f} points"
    )
    return "\n".join([*lines, "", *per_seed_lines])


_CURVE_NAMES = {
    "lora_robust_mean": "LoRA robust accuracy under {attack} (mean over budgets)",
    "ran_robust_mean": "RAN robust accuracy under {attack} (mean over budgets)",
    "transfer_upstream": "Transfer (upstream linear probe)",
}


def _describe_curve(name: str, record: dict, means_text: str) -> str:
    ratios = record["ratios"]
    text = f"{name} goes {means_text} over noise {', '.join(f'{100 * r:g}' for r in ratios)}%"
    if len(ratios) < 2:
        return text + "."
    change, at = record["change"], record["at"]
    if record["verdict"] == "peak":
        fall = record["best_to_last"]
        return text + (
            f": up {100 * change['mean']:.1f} points at {100 * at:g}% noise ({_interval(change)}), then down "
            f"{-100 * fall['mean']:.1f} points by {100 * ratios[-1]:g}% ({_interval(fall)})."
        )
    if record["verdict"] == "rise":
        return text + (
            f": up {100 * change['mean']:.1f} points at {100 * at:g}% noise ({_interval(change)}), and no "
            "distinguishable fall after it."
        )
    if record["verdict"] == "fall":
        return text + (
            f": down {-100 * change['mean']:.1f} points from clean data to {100 * at:g}% ({_interval(change)})."
        )
    return text + (
        f": not distinguishable from noise (largest change from clean data {100 * change['mean']:+.1f} points at "
        f"{100 * at:g}%, {_interval(change)}, binomial margin +-{100 * change['binomial_margin_95']:.1f})."
    )


def finding(report: dict) -> str:
    """One paragraph on what the numbers show, set against the paper's claim (moderate noise helps robustness and
    transfer, more noise hurts). A change counts only if the 95 % t-interval over seeds of its per-seed difference
    excludes zero and it exceeds the binomial margin of the test rows; otherwise it is "not distinguishable from
    noise"."""
    summary = report.get("summary") or summarise(report)
    attack = summary["attack"]
    seeds = summary["seeds"]
    rows = summary["eval_rows"]
    results = summary["results"]
    sentences = [
        f"Over {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}), robust accuracy "
        f"under {attack}; a change counts only where the 95% t-interval over seeds of its per-seed difference "
        f"excludes zero and it exceeds 1.96 binomial standard errors of a difference ({rows} test rows: one "
        f"accuracy near 50% has a standard error of {100 * binomial_se(0.5, rows):.1f} points)."
    ]
    if len(seeds) < 2:
        sentences.append(
            "With one seed there is no interval over seeds, so no change can be told from noise."
        )
    verdicts = {}
    for key, record in summary["curves"].items():
        name = _CURVE_NAMES[key].format(attack=attack)
        if key == "transfer_upstream":
            means = [_points(entry["transfer"]["upstream"]) for entry in results]
        else:
            means = [_points(entry[key.split("_")[0]]["robust_mean"]) for entry in results]
        sentences.append(_describe_curve(name, record, ", ".join(means) + "%"))
        verdicts[name.split(" (")[0].split(" robust")[0]] = record["verdict"]
    gaps = summary["ran_minus_lora_over_ratios"]

    def gap(stats: dict) -> str:
        verdict = "distinguishable" if stats["distinguishable"] else "not distinguishable from noise"
        return f"{100 * stats['mean']:+.1f} points ({_interval(stats)}; {verdict})"

    sentences.append(
        f"Averaged over noise levels RAN is {gap(gaps['robust_mean'])} robust under {attack} and "
        f"{gap(gaps['clean_accuracy'])} clean against LoRA."
    )
    ratios = [entry["ratio"] for entry in results]
    supported = [name for name, verdict in verdicts.items() if verdict == "peak"]
    if len(ratios) < 3:
        claim = "With fewer than three noise levels a rise-then-fall cannot be seen, so the paper's claim is not tested."
    elif supported:
        claim = (
            f"The rise-then-fall the paper reports (moderate noise helps, more noise hurts) shows in: "
            f"{', '.join(supported)}; not in: {', '.join(n for n in verdicts if n not in supported) or 'none'}."
        )
    else:
        claim = (
            "None of these curves shows the paper's rise-then-fall (moderate noise helps, more noise hurts) beyond the "
            "noise of the measurement; at this size the claim is not reproduced."
        )
    sentences.append(claim)
    failed = summary.get("failed_masking_checks") or []
    if failed:
        sentences.append(
            f"Gradient-masking checks failed for {len(failed)} run(s) ({', '.join(failed[:4])}"
            f"{', ...' if len(failed) > 4 else ''}): those robust figures are suspect."
        )
    sentences.append(
        "Synthetic data and tiny models: these numbers illustrate the method, not real medical VLMs."
    )
    return " ".join(sentences)


def plot(report: dict, path: Path) -> list[str]:
    """The PNG: downstream clean and robust accuracy, and transfer, against the noise ratio (mean and 95 %
    t-interval over seeds). Returns the legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    attack = summary["attack"]
    results = summary["results"]
    ratios = [100 * entry["ratio"] for entry in results]
    budgets = list(results[0]["lora"]["robust_accuracy"])
    colours = {"lora": "tab:blue", "ran": "tab:orange", "upstream": "tab:green"}
    styles = ["--", "-.", ":", (0, (1, 3)), (0, (5, 1))]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))

    # Each series a little to the side of the others, so that their interval bars do not hide each other.
    dodge = 0.008 * (max(ratios) - min(ratios) or 1.0)
    drawn = {"left": 0, "right": 0}

    def draw(axis: Any, stats: list[dict], **style: Any) -> None:
        side = "left" if axis is left else "right"
        shift = dodge * (drawn[side] - 2)
        drawn[side] += 1
        axis.errorbar(
            [ratio + shift for ratio in ratios],
            [100 * s["mean"] for s in stats],
            yerr=[100 * (s["half_width_95"] or 0.0) for s in stats],
            capsize=3,
            **style,
        )

    for method in METHODS:
        draw(
            left,
            [e[method]["clean_accuracy"] for e in results],
            marker="o",
            color=colours[method],
            label=f"{LABELS[method]} clean",
        )
        for index, budget in enumerate(budgets):
            draw(
                left,
                [e[method]["robust_accuracy"][budget] for e in results],
                marker=".",
                linestyle=styles[index % len(styles)],
                color=colours[method],
                label=f"{LABELS[method]} {attack} {budget}",
            )
    left.set_title(f"Downstream task '{report['settings']['task']}'", fontsize=10)
    transfer_task = results[0]["transfer"]["task"]
    for name in ("upstream", *METHODS):
        draw(
            right,
            [e["transfer"][name] for e in results],
            marker="o",
            color=colours[name],
            label={"upstream": "upstream model"}.get(name, f"{LABELS.get(name)} (fine-tuned)"),
        )
    right.set_title(f"Transfer: linear probe on '{transfer_task}'", fontsize=10)
    seeds = summary["seeds"]
    figure.suptitle(
        f"mean over seeds {', '.join(map(str, seeds))}"
        + (" with 95% t-intervals" if len(seeds) > 1 else " (one seed: no interval)"),
        fontsize=9,
    )
    for axis in (left, right):
        axis.set_xticks(ratios)
        axis.set_xlabel("upstream noise ratio (%)")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(0, 100)  # a 2-seed t-interval can reach past 0 and 100; accuracy cannot
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    labels = [text.get_text() for axis in (left, right) for text in axis.get_legend().get_texts()]
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return labels


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(parse_epsilon(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers.") from error


def _ratios(text: str) -> tuple[float, ...]:
    # Ratios may be given as fractions or percentages ("0,5%,10%").
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(float(p[:-1]) / 100 if p.endswith("%") else parse_epsilon(p) for p in parts)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ratios.") from error


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers.") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, two ratios, one seed: a smoke run.")
    parser.add_argument("--out", default="noise_study.json", help="JSON report; the PNG plot goes beside it.")
    parser.add_argument(
        "--merge",
        default=None,
        help="comma-separated reports of earlier runs over different seeds to join into --out (no training)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="Scratch folder (default: a temporary one, removed)."
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="one seed for everything, as before --seeds existed: the same as --seeds N --data-seed N",
    )
    converters = {
        "ratios": _ratios,
        "eval_epsilons": _fractions,
        "noise_epsilon": parse_epsilon,
        "seeds": _seeds,
    }
    for item in fields(StudySettings):
        if item.name == "progress":
            continue
        converter = converters.get(item.name, type(item.default))
        default = item.default
        if isinstance(default, tuple) and item.name == "seeds":
            default = ",".join(map(str, default))
        parser.add_argument(
            f"--{item.name.replace('_', '-')}",
            type=converter,
            default=None,
            choices=EVAL_ATTACKS if item.name == "eval_attack" else None,
            help=(HELP[item.name] + "; " if item.name in HELP else "")
            + f"default {default!r}"
            + (f", --quick {QUICK[item.name]!r}" if item.name in QUICK else ""),
        )
    return parser


def settings_from_arguments(arguments: argparse.Namespace) -> StudySettings:
    """The preset (full or `--quick`), with every option given on the command line on top."""
    settings = replace(StudySettings(), **QUICK) if arguments.quick else StudySettings()
    given = {
        item.name: getattr(arguments, item.name)
        for item in fields(StudySettings)
        if item.name != "progress" and getattr(arguments, item.name) is not None
    }
    if arguments.seed is not None:
        if "seeds" in given or "data_seed" in given:
            raise UsageError(
                "--seed N is --seeds N --data-seed N: give either --seed or --seeds/--data-seed."
            )
        given.update(seeds=(arguments.seed,), data_seed=arguments.seed)
    return replace(settings, **given, progress=arguments.progress)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.merge:
            merge([part.strip() for part in arguments.merge.split(",") if part.strip()], arguments.out)
            return 0
        settings = settings_from_arguments(arguments)
        run_study(settings, arguments.out, work_dir=arguments.work_dir)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
