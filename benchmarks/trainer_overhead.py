"""Where the end-to-end train time of RAN and LoRA goes through the stock Trainer: the steps themselves, the time
between steps (data, logging, callbacks) and the time before the first step, on the default small CLIP and task
(`examples/finetune.py`'s setup, `ran_peft.experiments.train_adapter`). Methods interleaved, round by round.

    python benchmarks/trainer_overhead.py --out benchmarks/results/trainer_overhead-cpu.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch

from ran_peft import PixelBox
from ran_peft import experiments as experiments_module
from ran_peft.callback import RANCallback
from ran_peft.experiments import ExperimentSettings, baseline_configs, clip_ran_config, train_adapter

METHODS = ("lora", "ran")


class StepClock(RANCallback):
    """`RANCallback` that also notes when each optimiser step begins and ends (first in, last out)."""

    log: list[dict[str, Any]] = []  # one record per training run, appended by on_train_begin

    def on_train_begin(self, args, state, control, **kwargs):
        self.record = {"train_begin": time.perf_counter(), "step_begin": [], "step_end": [], "cpu": []}
        StepClock.log.append(self.record)
        return super().on_train_begin(args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self.record["step_begin"].append(time.perf_counter())
        self.cpu_begin = time.process_time()
        return super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self.record["step_end"].append(time.perf_counter())
        self.record["cpu"].append(time.process_time() - self.cpu_begin)
        return super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self.record["train_end"] = time.perf_counter()
        return super().on_train_end(args, state, control, **kwargs)


def prepare(steps: int, batch_size: int, seed: int = 42):
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from ran_peft.data import ImageTextCollator, synthetic_medical_dataset, tokenize_class_prompts
    from ran_peft.pretrain import build_default_model

    folder = str(build_default_model(progress=False))
    processor = AutoProcessor.from_pretrained(folder)
    image_size = AutoConfig.from_pretrained(folder).vision_config.image_size
    train = synthetic_medical_dataset(
        steps * batch_size, seed=seed, image_size=image_size, task="anatomy", split_name="train"
    )
    box = PixelBox.from_processor(processor)
    settings = ExperimentSettings(max_steps=steps, batch_size=batch_size, seed=seed, progress=False)
    config = clip_ran_config(box)
    return dict(
        load=lambda: AutoModel.from_pretrained(folder),
        train=train,
        collator=ImageTextCollator(processor.image_processor, processor.tokenizer, mode="classification"),
        image_processor=processor.image_processor,
        class_text_inputs=tokenize_class_prompts(processor.tokenizer, train.features["label"].names),
        settings=settings,
        configs={name: config for name, config in baseline_configs(config).items() if name in METHODS},
    )


def time_one_run(setup: dict, name: str) -> dict[str, Any]:
    torch.manual_seed(setup["settings"].seed)
    model = setup["load"]()
    with tempfile.TemporaryDirectory() as work_dir:
        called, cpu_called = time.perf_counter(), time.process_time()
        _, _, train_seconds = train_adapter(
            model,
            setup["configs"][name],
            setup["train"],
            setup["collator"],
            setup["image_processor"],
            setup["settings"],
            work_dir,
            class_text_inputs=setup["class_text_inputs"],
        )
        returned, cpu_returned = time.perf_counter(), time.process_time()
    clock = StepClock.log[-1]
    begins, ends = clock["step_begin"], clock["step_end"]
    steps = [end - begin for begin, end in zip(begins, ends, strict=True)]
    gaps = [begin - end for end, begin in zip(ends[:-1], begins[1:], strict=True)]
    return {
        "train_seconds": train_seconds,  # what train_adapter reports (the robustness benchmark's figure)
        "before_first_step_seconds": begins[0] - called,
        "first_step_seconds": steps[0],
        "steps_seconds_total": sum(steps),
        "between_steps_seconds_total": sum(gaps),
        "after_last_step_seconds": returned - ends[-1],
        "step_seconds_median": statistics.median(steps),
        "step_seconds_median_after_first": statistics.median(steps[1:]),
        "between_steps_seconds_median": statistics.median(gaps) if gaps else 0.0,
        "step_seconds": steps,
        "step_cpu_seconds": clock["cpu"],
        "train_cpu_seconds": cpu_returned - cpu_called,
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def total(name: str, key: str) -> float:
        return sum(run[key] for run in runs[name])

    def median_step(name: str) -> float:
        return statistics.median(t for run in runs[name] for t in run["step_seconds"])

    end_to_end = total("ran", "train_seconds") / total("lora", "train_seconds")
    median = median_step("ran") / median_step("lora")
    cpu_end_to_end = total("ran", "train_cpu_seconds") / total("lora", "train_cpu_seconds")
    cpu_median = statistics.median(
        t for run in runs["ran"] for t in run["step_cpu_seconds"]
    ) / statistics.median(t for run in runs["lora"] for t in run["step_cpu_seconds"])
    parts = (
        "before_first_step_seconds",
        "first_step_seconds",
        "steps_seconds_total",
        "between_steps_seconds_total",
        "after_last_step_seconds",
    )
    return {
        "ran_over_lora_end_to_end_train_ratio": end_to_end,
        "ran_over_lora_median_step_ratio": median,
        "end_to_end_over_median_step_ratio": end_to_end / median,
        "ran_over_lora_steps_total_ratio": total("ran", "steps_seconds_total")
        / total("lora", "steps_seconds_total"),
        "seconds_by_part": {name: {part: total(name, part) for part in parts} for name in runs},
        "cpu_time": {  # process CPU time (all threads): less sensitive to what else runs on a shared machine
            "ran_over_lora_end_to_end_train_ratio": cpu_end_to_end,
            "ran_over_lora_median_step_ratio": cpu_median,
            "end_to_end_over_median_step_ratio": cpu_end_to_end / cpu_median,
        },
    }


def report(args, setup: dict, runs: dict[str, list[dict[str, Any]]], started: float) -> dict[str, Any]:
    return {
        **summarise(runs),
        "runs": runs,
        "complete_rounds": min(len(r) for r in runs.values()),
        "protocol": {
            "model": "the embedded default CLIP (ran_peft.pretrain.build_default_model), task anatomy",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "methods": {name: setup["configs"][name].recipe_dict() for name in METHODS},
            "step": "on_step_begin to on_step_end of the Trainer's callbacks: forward, backward, optimiser step",
            "end_to_end": "the seconds train_adapter reports (the robustness benchmark's train time), summed over "
            "rounds; median step: over all steps of all rounds",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per run (robustness: 150)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs per method, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.rounds = 6, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    experiments_module.RANCallback = StepClock  # train_adapter builds its callback from this name
    setup = prepare(args.steps, args.batch_size)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in METHODS}
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for round_index in range(args.rounds):
        for name in METHODS:
            run = time_one_run(setup, name)
            runs[name].append(run)
            print(
                f"round {round_index + 1}/{args.rounds} {name:>5}: train {run['train_seconds']:6.1f} s, steps "
                f"{run['steps_seconds_total']:6.1f} s, between {run['between_steps_seconds_total']:5.2f} s, before "
                f"{run['before_first_step_seconds']:5.2f} s, first step {run['first_step_seconds']:5.2f} s, median "
                f"step {1000 * run['step_seconds_median']:6.1f} ms",
                flush=True,
            )
            if (
                len({len(done) for done in runs.values()}) == 1
            ):  # after every whole round: a cut-short run keeps figures
                results = report(args, setup, runs, started)
                with open(args.out, "w") as handle:
                    json.dump(results, handle, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in results.items() if k.endswith("ratio")}, indent=2))


if __name__ == "__main__":
    main()
