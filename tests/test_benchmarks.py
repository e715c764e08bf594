"""The robustness and ablation benchmarks, end to end on a tiny offline CLIP: JSON structure, table and plot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EPSILONS = {"1/255", "2/255", "4/255"}


def _load(name: str):
    # Benchmarks are scripts, not a package: load them by file path.
    module_name = f"ran_peft_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _tiny(model_dir, out, attack="pgd"):
    return [
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--train-size",
        "8",
        "--eval-size",
        "8",
        "--eval-attack",
        attack,
        "--eval-attack-steps",
        "11",
        "--no-progress",
    ]


def _check_run(run, attack="pgd"):
    assert 0 <= run["clean_acc"] <= 1
    assert set(run["robust_acc"]) == EPSILONS
    assert all(0 <= value <= run["clean_acc"] + 1e-9 for value in run["robust_acc"].values())
    assert run["train_seconds"] > 0 and run["median_step_seconds"] > 0
    if attack == "pgd":
        assert run["attack"]["steps"] == 11 and run["attack"]["restarts"] == 1
    else:
        assert run["attack"]["name"] == "AutoAttack-quick"
        for key in EPSILONS:
            after = list(run["per_attack"][key].values())
            assert after == sorted(after, reverse=True) and after[-1] == run["robust_acc"][key]
    assert run["loss_log"] and all("loss" in entry for entry in run["loss_log"])


# ~60 s on a busy 2-core machine
@pytest.mark.slow
def test_robustness_writes_json_table_and_plot(tmp_path, tiny_clip_dir):
    out = tmp_path / "robustness.json"
    methods = ["lora", "ran", "fgsm_rs", "fare"]
    arguments = [*_tiny(tiny_clip_dir, out, attack="autoattack-quick"), "--methods", ",".join(methods)]
    returned = _load("robustness").main([*arguments, "--seeds", "1,2"])
    results = json.loads(out.read_text())
    assert list(results["runs"]) == methods and results["seeds"] == [1, 2]
    assert results["runs"].keys() == returned["runs"].keys()
    for seeds in results["runs"].values():
        assert set(seeds) == {"1", "2"}
        for run in seeds.values():
            _check_run(run, attack="autoattack-quick")
            assert run["train_time_ratio_to_lora"] > 0 and run["median_step_ratio_to_lora"] > 0
    summary = results["summary"]
    assert summary["lora"]["train_time_ratio_to_lora"]["mean"] == pytest.approx(1.0)
    ran = summary["ran"]
    assert results["end_to_end_over_median_step_ratio"] == pytest.approx(
        ran["train_time_ratio_to_lora"]["mean"] / ran["median_step_ratio_to_lora"]["mean"]
    )
    clean = [run["clean_acc"] for run in results["runs"]["ran"].values()]
    assert ran["clean_acc"]["mean"] == pytest.approx(sum(clean) / 2) and ran["clean_acc"]["n"] == 2
    assert (
        results["recipes"]["fare"]["task_weight"] == 0
        and results["recipes"]["fare"]["attack_loss"] == "consistency"
    )
    assert results["recipes"]["ran"]["attack_steps"] == 1 and results["recipes"]["lora"]["epsilon"] == 0
    assert {"machine", "torch_version", "seed", "settings"} <= set(results)
    table = (tmp_path / "robustness.md").read_text()
    assert "| method | clean | robust @1/255 | robust @2/255 | robust @4/255 | train time / LoRA |" in table
    assert all(f"| {name} |" in table for name in methods) and "AutoAttack-quick" in table
    assert "after apgd-ce" in table and "after square" in table
    ran_runs = results["runs"]["ran"]
    assert (
        f"| ran | {ran_runs['1']['train_time_ratio_to_lora']:.2f} ({ran_runs['1']['median_step_ratio_to_lora']:.2f})"
        f" | {ran_runs['2']['train_time_ratio_to_lora']:.2f} ({ran_runs['2']['median_step_ratio_to_lora']:.2f}) |"
    ) in table
    assert (tmp_path / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # one process per seed, joined afterwards: the same summary as one process over both seeds
    halves = []
    for seed in ("1", "2"):
        half = {
            **results,
            "seeds": [int(seed)],
            "runs": {m: {seed: r[seed]} for m, r in results["runs"].items()},
        }
        halves.append(tmp_path / f"seed{seed}.json")
        halves[-1].write_text(json.dumps(half))
    merged = _load("robustness").main(
        ["--out", str(tmp_path / "merged.json"), "--merge", ",".join(map(str, halves))]
    )
    for name, entry in summary.items():
        assert merged["summary"][name]["clean_acc"] == pytest.approx(entry["clean_acc"])
        assert merged["summary"][name]["robust_acc"] == entry["robust_acc"] or all(
            merged["summary"][name]["robust_acc"][k] == pytest.approx(v)
            for k, v in entry["robust_acc"].items()
        )
        assert merged["summary"][name]["train_time_ratio_to_lora"] == pytest.approx(
            entry["train_time_ratio_to_lora"]
        )
    assert merged["seeds"] == [1, 2] and (tmp_path / "merged.md").exists()

    # --jobs 2: each (method, seed) in a process of its own gives the numbers the single process gave, bit for bit
    parallel = _load("robustness").main(
        [*_tiny(tiny_clip_dir, tmp_path / "parallel.json", attack="autoattack-quick")]
        + ["--methods", "ran,lora", "--seeds", "2,1", "--jobs", "2"]
    )
    assert parallel["seeds"] == [1, 2] and parallel["jobs"] == 2
    assert list(parallel["runs"]) == ["lora", "ran"] and list(parallel["recipes"]) == ["lora", "ran"]
    assert sorted(p.name for p in (tmp_path / "parallel-parts").glob("*.json")) == [
        "lora-seed1.json",
        "lora-seed2.json",
        "ran-seed1.json",
        "ran-seed2.json",
    ]
    assert parallel["recipes"] == {name: results["recipes"][name] for name in ("lora", "ran")}
    for name in ("lora", "ran"):
        assert list(parallel["runs"][name]) == ["1", "2"]
        for seed in ("1", "2"):
            alone, together = parallel["runs"][name][seed], results["runs"][name][seed]
            assert alone["clean_acc"] == together["clean_acc"]
            assert alone["robust_acc"] == together["robust_acc"]
            assert [e["loss"] for e in alone["loss_log"]] == [e["loss"] for e in together["loss_log"]]
            assert "train_time_ratio_to_lora" in alone


def test_jobs_start_lora_first_then_the_longest_runs():
    units = _load("robustness").job_units([42, 43], ["tecoa", "ran", "lora", "trades"])
    assert units == [
        ("lora", 42),
        ("lora", 43),
        ("ran", 42),
        ("ran", 43),
        ("trades", 42),
        ("trades", 43),
        ("tecoa", 42),
        ("tecoa", 43),
    ]
    assert set(_load("robustness").JOB_ORDER) == set(_load("robustness").METHODS)


def test_robustness_refuses_an_evaluation_attack_no_stronger_than_training(tmp_path, tiny_clip_dir):
    arguments = _tiny(tiny_clip_dir, tmp_path / "r.json")
    arguments[arguments.index("--eval-attack-steps") + 1] = "10"
    with pytest.raises(SystemExit, match="must be stronger"):
        _load("robustness").main([*arguments, "--methods", "pgd_at"])
    assert not (tmp_path / "r.json").exists()


# ~10 s of CPU; 30 s on a busy 2-core machine
@pytest.mark.slow
def test_ablation_writes_json_and_a_table_with_deltas_and_the_generated_paragraph(tmp_path, tiny_clip_dir):
    out = tmp_path / "ablation.json"
    variants = "default,lora,no_kl,consistency"
    _load("ablation").main([*_tiny(tiny_clip_dir, out), "--variants", variants])
    results = json.loads(out.read_text())
    assert list(results["variants"]) == variants.split(",")
    for row in results["variants"].values():
        _check_run(row)
        assert set(row["delta_vs_default"]["robust_acc"]) == EPSILONS
    assert results["variants"]["default"]["delta_vs_default"]["clean_acc"] == 0
    assert results["variants"]["no_kl"]["recipe"]["kl_weight"] == 0
    assert results["variants"]["consistency"]["recipe"]["consistency_weight"] > 0
    assert results["default_recipe"]["kl_weight"] == 1.0
    table = (tmp_path / "ablation.md").read_text()
    assert "| variant | change | clean |" in table and "| no_kl | kl_weight=0.0 |" in table
    assert "## What the table says about the defaults" in table
    assert results["defaults_paragraph"] in table


def _row(clean, robust4, seconds=10.0):
    robust = {"1/255": robust4 + 0.1, "2/255": robust4 + 0.05, "4/255": robust4}
    return {"clean_acc": clean, "robust_acc": robust, "train_seconds": seconds, "eval_samples": 300}


def test_the_defaults_paragraph_follows_the_numbers():
    ablation = _load("ablation")
    rows = {
        "default": _row(0.80, 0.40),
        "lora": _row(0.82, 0.05, 5.0),
        "no_kl": _row(0.81, 0.30),
        "kl_weight_3": _row(0.70, 0.60),  # more robust, but 12 clean points below LoRA: not eligible
        "attack_steps_2": _row(0.80, 0.52, 15.0),  # the best eligible one, beyond the noise
    }
    text = ablation.defaults_paragraph({"variants": rows})
    assert "The best robust@4/255 among them is `attack_steps_2`" in text
    assert "+12.0 points against the default (beyond the noise)" in text
    assert "`no_kl` -10.0" in text and "costs robustness" in text
    assert "should change towards `attack_steps_2`" in text

    rows["attack_steps_2"] = _row(0.80, 0.41, 15.0)
    text = ablation.defaults_paragraph({"variants": rows})
    assert "the defaults stand" in text


def test_task_difficulty_reports_chance_zero_shot_and_probe_for_every_task(tmp_path, tiny_clip_dir):
    from ran_peft.data import SYNTHETIC_TASKS

    out = tmp_path / "difficulty.json"
    args = ["--out", str(out), "--model", str(tiny_clip_dir), "--train-size", "30", "--eval-size", "10"]
    results = _load("task_difficulty").main(args)
    assert json.loads(out.read_text()) == results
    assert set(results["tasks"]) == set(SYNTHETIC_TASKS)
    for task, row in results["tasks"].items():
        assert row["chance"] == pytest.approx(1 / len(SYNTHETIC_TASKS[task]))
        # 10 test rows: every accuracy is a whole number of rows out of 10
        for key in ("zero_shot_acc", "linear_probe_acc"):
            assert 0 <= row[key] <= 1 and round(10 * row[key], 6) == round(10 * row[key])
    assert "| anatomy | 5 |" in out.with_suffix(".md").read_text()


# ~40 s on a busy 2-core machine
@pytest.mark.slow
def test_vqa_robustness_writes_json_table_plot_and_the_readme_section(tmp_path, tiny_generative_default):
    benchmark = _load("vqa_robustness")
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\nbefore\n\n{benchmark.README_START}\nold text\n{benchmark.README_END}\n\nafter\n"
    )
    out = tmp_path / "results" / "vqa.json"
    arguments = [
        "--out",
        str(out),
        "--model",
        str(tiny_generative_default),
        "--steps",
        "2",
        "--batch-size",
        "4",
    ]
    arguments += ["--train-size", "8", "--eval-size", "6", "--methods", "before,lora,ran", "--seeds", "3"]
    results = benchmark.main([*arguments, "--no-progress", "--readme", str(readme)])
    saved = json.loads(out.read_text())
    assert saved["runs"].keys() == {"before", "lora", "ran"} and saved["seeds"] == [3]
    assert set(saved["recipes"]) == {"lora", "ran"} and saved["recipes"]["lora"]["epsilon"] == 0
    for name in ("lora", "ran"):
        run = saved["runs"][name]["3"]
        assert set(run["robust_acc"]) == set(run["generate_robust_acc"]) == EPSILONS
        assert run["attack"]["name"] == "AutoAttack-quick" and run["eval_samples"] == 6
        assert all(0 <= value <= run["clean_acc"] + 1e-9 for value in run["robust_acc"].values())
        assert run["train_seconds"] > 0 and run["loss_log"]
    assert saved["runs"]["ran"]["3"]["train_time_ratio_to_lora"] > 0
    assert 0.3 < saved["chance_accuracy"] < 0.4  # (1/5 + 1/4 + 1/2) / 3 on balanced question types
    assert set(saved["goals"]) == {"robust_gain_over_lora", "clean_gap_to_lora"}
    assert results["summary"]["ran"]["clean_acc"]["n"] == 1
    table = (tmp_path / "results" / "vqa.md").read_text()
    assert "AutoAttack-quick" in table and "| before fine-tuning |" in table and "| ran |" in table
    assert (tmp_path / "results" / "vqa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert (
        "old text" not in text and text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    )
    assert "| ran |" in text and "Goals met" in text and "results/vqa.png" in text
    # the section is generated from the JSON alone: --merge of the same file rewrites it identically
    benchmark.main(["--out", str(tmp_path / "merged.json"), "--merge", str(out)])
    assert benchmark.markdown(json.loads((tmp_path / "merged.json").read_text())) == benchmark.markdown(saved)


def test_vqa_robustness_methods_are_a_table_of_ran_configs():
    benchmark = _load("vqa_robustness")
    from ran_peft import PixelBox, RANConfig

    configs = benchmark.method_configs(benchmark.base_config(PixelBox()))
    assert list(configs) == list(benchmark.METHODS)
    assert list(configs) == [
        "lora",
        "fgsm_rs",
        "tecoa",
        "ran",
        "ran_features",
        "ran_every3",
        "ran_features_task",
        "ran_free2",
        "ran_free3",
    ]
    assert all(isinstance(config, RANConfig) for config in configs.values())
    assert (
        configs["ran_features"].adversarial_pass == "image_features"
        and configs["ran_every3"].attack_every == 3
        and configs["ran_features_task"].attack_loss == "task"
        and configs["ran_free2"].free_replay == 2
    )
    assert configs["ran"].recipe_dict() == {
        **RANConfig().recipe_dict(),
        "image_mean": [0.0],
        "image_std": [1.0],
    }
    units = benchmark.job_units([1, 2], ["ran", "before", "lora"])
    assert units == [("lora", 1), ("before", 1), ("ran", 1), ("lora", 2), ("ran", 2)]


def test_vqa_goals_judge_the_light_weight_recipe_against_ran():
    benchmark = _load("vqa_robustness")

    def entry(clean, robust):
        return {"clean_acc": {"mean": clean}, "robust_acc": {"4/255": {"mean": robust}}}

    summary = {
        "lora": entry(0.90, 0.05),
        "ran": entry(0.88, 0.40),
        "ran_features": entry(0.89, 0.385),
        "ran_every3": entry(0.90, 0.30),
    }
    found = benchmark.goals(summary)
    assert found["robust_gain_over_lora"]["met"] and found["clean_gap_to_lora"]["met"]
    assert found["ran_features_robust_vs_ran"]["met"]  # 1.5 points under RAN's
    assert found["ran_features_robust_vs_ran"]["points"] == pytest.approx(1.5)
    assert not found["ran_every3_robust_vs_ran"]["met"]  # 10 points under


def test_term_ablations_each_switch_off_exactly_one_term_of_the_default():
    from ran_peft import RANConfig
    from ran_peft.experiments import term_ablation_configs

    default = RANConfig()
    switched_off = {
        "ran_no_adversarial_loss": {"adversarial_weight": 0.0},
        "ran_no_kl": {"kl_weight": 0.0},
        "ran_no_free_start": {"free_start": False},
        "ran_no_random_start": {"random_start": False},
    }
    configs = term_ablation_configs(default)
    assert list(configs) == list(_load("robustness").TERM_ABLATIONS) == list(switched_off)
    for name, config in configs.items():
        changed = {
            key: value for key, value in config.recipe_dict().items() if value != default.recipe_dict()[key]
        }
        assert changed == switched_off[name], name
