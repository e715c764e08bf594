"""examples/noise_study.py: the study end to end at micro size over two seeds (report structure, the attack named,
per-seed numbers and their summary, plot, noise share, --merge), its command line presets, the statistics over
seeds, and the finding it derives from the intervals."""

import importlib.util
import json
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_study():
    spec = importlib.util.spec_from_file_location("noise_study", ROOT / "examples" / "noise_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


study = _load_study()

MICRO = dict(
    ratios=(0.0, 0.25),
    noise_steps=2,
    image_size=32,
    upstream_size=30,
    pretrain_steps=3,
    pretrain_batch_size=8,
    train_size=16,
    eval_size=8,
    finetune_steps=2,
    batch_size=8,
    eval_epsilons=(1 / 255, 4 / 255),
    transfer_train_size=16,
    transfer_eval_size=8,
    seeds=(0, 1),
    progress=False,
)


def _split(report, seed, path):
    """A one-seed report as a run of `--seeds <seed>` would have written it."""
    part = {
        **report,
        "settings": {**report["settings"], "seeds": [seed]},
        "runs": {str(seed): report["runs"][str(seed)]},
    }
    path.write_text(json.dumps(part))
    return path


@pytest.mark.slow  # about 50 s on a busy 2-core machine (AutoAttack-quick over two seeds)
def test_micro_study_over_two_seeds_reports_each_seed_their_summary_and_merges(tmp_path):
    settings = study.StudySettings(**MICRO)
    out = tmp_path / "study" / "noise.json"
    work = tmp_path / "work"
    returned = study.run_study(settings, out, work_dir=work)

    report = json.loads(out.read_text())
    assert report["runs"] == json.loads(json.dumps(returned["runs"]))
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(report["runs"]) == {"0", "1"} and "unfinished_seed" not in report
    n = settings.upstream_size
    for seed, run in report["runs"].items():
        assert run["seed"] == int(seed)
        assert [entry["ratio"] for entry in run["results"]] == [0.0, 0.25]
        for entry in run["results"]:
            assert entry["upstream_rows"] == n
            assert entry["noisy_fraction"] == round(entry["ratio"] * n) / n
            for method in ("lora", "ran"):
                measured = entry[method]
                assert 0 <= measured["clean_accuracy"] <= 1
                assert set(measured["robust_accuracy"]) == {"1/255", "4/255"}
                assert all(0 <= v <= measured["clean_accuracy"] for v in measured["robust_accuracy"].values())
                # the reported robust accuracy is AutoAttack-quick's, seeded by the run seed
                assert measured["attack"]["name"] == "AutoAttack-quick"
                assert measured["attack"]["seed"] == int(seed)
                assert measured["num_samples"] == settings.eval_size
            transfer = entry["transfer"]
            assert transfer["task"] == "modality"
            assert all(0 <= transfer[name] <= 1 for name in ("upstream", "lora", "ran"))
        assert run["results"][1]["noisy_rows"] == 8  # round(0.25 * 30) = round(7.5) = 8
        timings = run["timings_seconds"]  # per seed
        assert {"surrogate_pretraining", "per_ratio", "total"} <= set(timings)
        assert {"noise", "pretraining", "lora_train", "lora_eval", "ran_train", "ran_eval"} <= set(
            timings["per_ratio"]["0.25"]
        )
    # a seed redraws the training: the same ratio and method train to a different loss under another seed
    for method in ("lora", "ran"):
        losses = [report["runs"][seed]["results"][1][method]["train_loss"] for seed in ("0", "1")]
        assert losses[0] != losses[1]
    assert {"data", "plot", "total"} <= set(report["timings_seconds"])

    # the summary holds every seed's value and their mean
    summary = report["summary"]
    assert summary["seeds"] == [0, 1] and summary["attack"] == "AutoAttack-quick"
    assert report["design"]["attack"] == "AutoAttack-quick"
    assert "AutoAttack-quick" in report["design"]["robust_accuracy"]
    for index, entry in enumerate(summary["results"]):
        for method in ("lora", "ran"):
            stats = entry[method]["robust_accuracy"]["4/255"]
            values = [
                report["runs"][s]["results"][index][method]["robust_accuracy"]["4/255"] for s in ("0", "1")
            ]
            assert stats["per_seed"] == {"0": values[0], "1": values[1]}
            assert stats["mean"] == pytest.approx(statistics.fmean(values))
            assert stats["binomial_se"] == pytest.approx(study.binomial_se(stats["mean"], settings.eval_size))
    assert "AutoAttack-quick" in report["finding"] and "RAN" in report["finding"]
    assert "PGD-10" not in report["finding"] and "AutoAttack-quick" in study.table(report)
    assert work.is_dir() and not list((tmp_path / "study").glob(".noise.json.tmp*"))

    # two one-seed files join into the same summary and finding as the two-seed run
    parts = [_split(report, seed, tmp_path / f"part{seed}.json") for seed in (1, 0)]
    merged = study.merge(parts, tmp_path / "merged.json")
    assert merged["summary"] == report["summary"] and merged["finding"] == report["finding"]
    assert merged["runs"] == report["runs"] and merged["settings"] == report["settings"]


def test_quick_preset_and_command_line_overrides():
    parser = study.build_parser()
    quick = study.settings_from_arguments(parser.parse_args(["--quick", "--ratios", "0,10%"]))
    assert quick.ratios == (0.0, 0.1) and quick.seeds == (0,) and quick.data_seed == 0
    assert (
        quick.image_size == study.QUICK["image_size"] and quick.upstream_size == study.QUICK["upstream_size"]
    )
    # --seed N is the single-seed study of before: run seed and data seed N
    single = study.settings_from_arguments(parser.parse_args(["--quick", "--seed", "3"]))
    assert single.seeds == (3,) and single.data_seed == 3
    several = study.settings_from_arguments(parser.parse_args(["--seeds", "4,5", "--data-seed", "7"]))
    assert several.seeds == (4, 5) and several.data_seed == 7
    with pytest.raises(study.UsageError, match="--seed"):
        study.settings_from_arguments(parser.parse_args(["--seed", "3", "--seeds", "1,2"]))
    full = study.settings_from_arguments(parser.parse_args(["--eval-epsilons", "2/255", "--no-progress"]))
    assert full == study.StudySettings(eval_epsilons=(2 / 255,), progress=False)
    assert full.ratios == (0.0, 0.05, 0.1, 0.2, 0.3, 0.5) and full.seeds == (0, 1, 2)
    assert full.eval_attack == "autoattack-quick"  # the reported figure is never the project's PGD by default
    pgd = study.settings_from_arguments(parser.parse_args(["--eval-attack", "pgd"]))
    assert pgd.eval_attack == "pgd" and study.attack_label(pgd) == "PGD-10 (training-tool attack)"
    with pytest.raises(SystemExit):
        parser.parse_args(["--eval-attack", "fgsm"])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(ratios=(0.0, 1.5)), "--ratios"),
        (dict(pretrain_batch_size=64, upstream_size=32), "--pretrain-batch-size"),
        (dict(transfer_task="colour"), "--transfer-task"),
        (dict(image_size=36), "--image-size"),
        (dict(seeds=()), "--seeds"),
        (dict(seeds=(1, 1)), "--seeds"),
        (dict(eval_attack="apgd"), "--eval-attack"),
        (dict(task="laterality"), "at least 4"),
    ],
)
def test_bad_settings_fail_before_anything_runs(tmp_path, settings, message):
    with pytest.raises(study.UsageError, match=message):
        study.run_study(study.StudySettings(**settings), tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


# -- statistics over seeds ---------------------------------------------------------------------------------------


def test_t_quantile_and_interval_over_seeds():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 10, 30, 31, 45, 200):
        assert study.t_quantile_975(df) == pytest.approx(float(scipy_stats.t.ppf(0.975, df)), abs=1e-4)
    stats = study.seed_stats({"0": 0.2, "1": 0.4, "2": 0.6}, rows=100)
    half = 4.3027 * 0.2 / math.sqrt(3)
    assert stats["mean"] == pytest.approx(0.4) and stats["std"] == pytest.approx(0.2)
    assert stats["half_width_95"] == pytest.approx(half)
    assert stats["t_interval_95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert stats["binomial_se"] == pytest.approx(math.sqrt(0.4 * 0.6 / 100))
    one = study.seed_stats({"0": 0.5}, rows=100)
    assert one["half_width_95"] is None and one["t_interval_95"] is None


def test_a_difference_counts_only_beyond_both_the_seed_interval_and_the_binomial_margin():
    # consistent over seeds and large: distinguishable
    assert study.difference_stats({"0": 0.6, "1": 0.62, "2": 0.61}, {"0": 0.4, "1": 0.41, "2": 0.4}, 400)[
        "distinguishable"
    ]
    # the same mean change, but the seeds disagree: the interval holds zero
    noisy = study.difference_stats({"0": 0.9, "1": 0.3, "2": 0.63}, {"0": 0.4, "1": 0.41, "2": 0.4}, 400)
    assert noisy["t_interval_95"][0] < 0 and not noisy["distinguishable"]
    # consistent over seeds but smaller than the test rows can tell (margin about 6.4 points at 400 rows)
    small = study.difference_stats({"0": 0.33, "1": 0.33, "2": 0.33}, {"0": 0.30, "1": 0.30, "2": 0.30}, 400)
    assert small["t_interval_95"] == pytest.approx([0.03, 0.03])
    assert small["binomial_margin_95"] == pytest.approx(0.0637, abs=1e-3) and not small["distinguishable"]
    # one seed: no interval, never distinguishable
    assert not study.difference_stats({"0": 0.9}, {"0": 0.1}, 400)["distinguishable"]


# -- fake reports: the summary, the finding and --merge without training -----------------------------------------


def _fake_run(seed, robust_by_ratio, transfer_by_ratio, n=400, ran_gain=0.1):
    results = []
    for (ratio, robust), upstream in zip(robust_by_ratio.items(), transfer_by_ratio, strict=True):
        run = {
            "clean_accuracy": 0.8,
            "robust_accuracy": {"1/255": robust, "4/255": robust},
            "num_samples": n,
            "attack": {"name": "AutoAttack-quick", "seed": seed},
            "passed_checks": True,
        }
        results.append(
            {
                "ratio": ratio,
                "noisy_rows": round(ratio * 100),
                "upstream_rows": 100,
                "noisy_fraction": round(ratio * 100) / 100,
                "lora": run,
                "ran": {
                    **run,
                    "robust_accuracy": {k: v + ran_gain for k, v in run["robust_accuracy"].items()},
                },
                "transfer": {"task": "laterality", "upstream": upstream, "lora": 0.5, "ran": 0.5},
            }
        )
    return {"seed": seed, "results": results, "timings_seconds": {"total": 1.0 + seed}}


def _fake_report(runs, n=400):
    settings = asdict(study.StudySettings(seeds=tuple(runs), transfer_eval_size=n))
    report = {
        "settings": settings,
        "design": {"attack": study.attack_label(settings)},
        "runs": {str(seed): run for seed, run in runs.items()},
        "timings_seconds": {"total": 3.0},
    }
    report["summary"] = study.summarise(report)
    return report


def _jitter(values, step):
    return {ratio: value + step for ratio, value in values.items()}


def test_summary_holds_each_seed_and_the_mean_of_the_seeds():
    robust = {0.0: 0.30, 0.1: 0.50, 0.5: 0.20}
    report = _fake_report(
        {seed: _fake_run(seed, _jitter(robust, 0.01 * seed), [0.6] * 3) for seed in (0, 1, 2)}
    )
    entry = report["summary"]["results"][1]
    stats = entry["lora"]["robust_accuracy"]["1/255"]
    assert stats["per_seed"] == pytest.approx({"0": 0.50, "1": 0.51, "2": 0.52})
    assert stats["mean"] == pytest.approx(0.51) and stats["n"] == 3
    assert entry["ran_minus_lora"]["robust_mean"]["mean"] == pytest.approx(0.1)
    assert report["summary"]["ran_minus_lora_over_ratios"]["clean_accuracy"]["mean"] == pytest.approx(0.0)
    assert report["summary"]["attack"] == "AutoAttack-quick"


def test_finding_reports_a_rise_then_fall_only_when_the_intervals_show_one():
    robust = {0.0: 0.30, 0.1: 0.50, 0.5: 0.20}
    transfer = [0.6, 0.6, 0.6]
    steady = _fake_report({s: _fake_run(s, _jitter(robust, 0.005 * s), transfer) for s in (0, 1, 2)})
    peaked = study.finding(steady)
    assert "shows in: LoRA, RAN; not in: Transfer" in peaked
    assert "under AutoAttack-quick" in peaked and "RAN is +10.0 points" in peaked
    assert "Transfer (upstream linear probe) goes" in peaked and "not distinguishable from noise" in peaked

    # the same means, but the seeds disagree on every change from clean data: nothing can be told from noise
    wild = {
        0: _jitter(robust, 0.0),
        1: {0.0: 0.10, 0.1: 0.70, 0.5: 0.30},
        2: {0.0: 0.50, 0.1: 0.30, 0.5: 0.10},
    }
    scattered = study.finding(_fake_report({s: _fake_run(s, wild[s], transfer) for s in wild}))
    assert "None of these curves shows" in scattered
    assert scattered.count("not distinguishable from noise") >= 3

    # a steady fall in transfer counts as a fall
    falling = study.finding(_fake_report({s: _fake_run(s, robust, [0.8, 0.7, 0.5]) for s in (0, 1)}))
    assert (
        "Transfer (upstream linear probe) goes 80.0±0.0, 70.0±0.0, 50.0±0.0% over noise 0, 10, 50%: down"
        in (falling)
    )

    one_seed = study.finding(_fake_report({0: _fake_run(0, robust, transfer)}))
    assert "With one seed there is no interval" in one_seed and "None of these curves shows" in one_seed
    two_levels = study.finding(
        _fake_report({s: _fake_run(s, {0.0: 0.30, 0.2: 0.50}, [0.6, 0.6]) for s in (0, 1)})
    )
    assert "not tested" in two_levels


def test_plot_and_table_name_the_attack_beside_every_robust_figure(tmp_path):
    report = _fake_report({s: _fake_run(s, {0.0: 0.3, 0.2: 0.4}, [0.6, 0.6]) for s in (0, 1)})
    labels = study.plot(report, tmp_path / "plot.png")
    robust = [label for label in labels if "/255" in label]
    assert len(robust) == 4 and all("AutoAttack-quick" in label for label in robust)
    text = study.table(report)
    assert "robust accuracy under AutoAttack-quick" in text and "per seed (0 / 1)" in text
    assert "30.0/30.0" in text  # each seed's value


def test_merge_joins_one_seed_files_into_the_summary_of_one_run_over_both(tmp_path):
    runs = {
        seed: _fake_run(seed, {0.0: 0.30 + 0.02 * seed, 0.1: 0.45, 0.5: 0.25 - 0.01 * seed}, [0.6, 0.55, 0.5])
        for seed in (0, 1)
    }
    together = _fake_report(runs)
    together["finding"] = study.finding(together)
    parts = [_split(together, seed, tmp_path / f"seed{seed}.json") for seed in (1, 0)]
    out = tmp_path / "merged" / "noise.json"
    assert study.main(["--merge", f"{parts[0]},{parts[1]}", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["summary"] == json.loads(json.dumps(together["summary"]))
    assert merged["finding"] == together["finding"]
    assert merged["settings"]["seeds"] == [0, 1] and list(merged["runs"]) == ["0", "1"]
    assert [part["seeds"] for part in merged["merged_from"]] == [[1], [0]]
    assert [part["total_seconds"] for part in merged["merged_from"]] == [3.0, 3.0]
    assert merged["runs"]["1"]["timings_seconds"] == {"total": 2.0}  # per-seed timings kept
    assert out.with_suffix(".png").stat().st_size > 0


def test_merge_refuses_overlapping_seeds_and_different_studies(tmp_path, capsys):
    report = _fake_report({s: _fake_run(s, {0.0: 0.3, 0.2: 0.4}, [0.6, 0.6]) for s in (0, 1)})
    first = _split(report, 0, tmp_path / "a.json")
    again = _split(report, 0, tmp_path / "b.json")
    assert study.main(["--merge", f"{first},{again}", "--out", str(tmp_path / "c.json")]) == 2
    assert "seed 0 is in more than one file" in capsys.readouterr().err
    other = json.loads(_split(report, 1, tmp_path / "d.json").read_text())
    other["settings"]["eval_attack"] = "pgd"
    (tmp_path / "d.json").write_text(json.dumps(other))
    with pytest.raises(study.UsageError, match="eval_attack"):
        study.merge([first, tmp_path / "d.json"], tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("ratios_done", [0, 1])
def test_an_interrupted_study_leaves_its_whole_seeds_behind(tmp_path, monkeypatch, ratios_done):
    def fake_run_seed(data, settings, seed, work, on_ratio=None):
        run = _fake_run(seed, {0.0: 0.3, 0.25: 0.4}, [0.6, 0.6], n=settings.eval_size)
        if seed == 1:  # interrupted after `ratios_done` of its ratios
            if ratios_done:
                on_ratio({**run, "results": run["results"][:ratios_done]})
            raise KeyboardInterrupt
        return run

    monkeypatch.setattr(study, "run_seed", fake_run_seed)
    out = tmp_path / "noise.json"
    with pytest.raises(KeyboardInterrupt):
        study.run_study(study.StudySettings(**{**MICRO, "seeds": (0, 1, 2)}), out)
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["0"] and report["summary"]["seeds"] == [0]
    if ratios_done:
        assert report["unfinished_seed"]["seed"] == 1 and len(report["unfinished_seed"]["results"]) == 1
    else:
        assert "unfinished_seed" not in report
    # the whole seed of an interrupted run merges; an unfinished one is left out and said so
    merged = study.merge([out], tmp_path / "merged.json")
    assert merged["summary"]["seeds"] == [0] and merged["runs"] == report["runs"]
    assert merged["merged_from"][0].get("left_out_unfinished_seed") == (1 if ratios_done else None)
