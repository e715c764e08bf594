"""Saving, sharing and loading RAN adapters: an atomic local save with a model card of the adapter's robustness,
a push to the Hugging Face Hub that never loses the local copy, and a loader that restores the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ran_peft.config import RAN_CONFIG_NAME, RANConfig

METRICS_NAME = "ran_metrics.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
ADAPTER_FILES = ("adapter_config.json", SAFE_WEIGHTS_NAME, RAN_CONFIG_NAME)


class HubPushError(RuntimeError):
    """A push to the Hub failed; the adapter is still saved locally (the message says where)."""


def _is_local_path(value: str | None) -> bool:
    return bool(value) and (os.path.isabs(value) or os.path.exists(value) or value.startswith((".", "~")))


def public_model_name(value: str | None) -> str | None:
    """A base-model name fit to publish: a Hub id stays, a local path (the user's own disk) becomes None."""
    return None if value is None or _is_local_path(value) else value


# How open_clip writes a Hub id (`hf-hub:owner/name`) and a local folder (`local-dir:path`).
_OPEN_CLIP_HUB_PREFIX, _OPEN_CLIP_LOCAL_PREFIX = "hf-hub:", "local-dir:"


def hub_model_id(value: str | None) -> str | None:
    """The Hub id of a base model, for the card's `base_model`: None for a local path or a name that is no Hub id.

    open_clip's `hf-hub:owner/name` gives `owner/name`; `local-dir:...` and folders on disk give None.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not value or value.startswith(_OPEN_CLIP_LOCAL_PREFIX):
        return None
    value = value.removeprefix(_OPEN_CLIP_HUB_PREFIX)
    if public_model_name(value) is None:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


# `model-index` task types by how the robust accuracy was scored (`ran_peft.families` names the family).
TASK_TYPES = {
    "image_classifier": "image-classification",
    "dual_encoder": "image-classification",  # scored as a prompt classifier (image-to-class-prompt logits)
    "open_clip": "image-classification",
    "generative": "image-text-to-text",
}
_NORM_NAMES = {"linf": "L-inf", "l2": "L2"}


def _adapter_run(metrics: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The evaluation of the adapter itself: the run named `ran`, else the only or the last run."""
    runs = metrics.get("runs")
    if not runs:
        return "adapter", metrics
    name = "ran" if "ran" in runs else list(runs)[-1]
    return name, runs[name]


def _attack_of(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    return metrics.get("attack") or _adapter_run(metrics)[1].get("attack") or {}


def attack_label(attack: Mapping[str, Any]) -> str:
    """The attack in a few words, e.g. "AutoAttack-quick (APGD-CE, APGD-T, FAB-T, Square)" or "PGD-20, 1 restart"."""
    name = str(attack.get("name") or "an unnamed attack")
    if name.lower().startswith("autoattack"):
        parts = [part.upper().replace("SQUARE", "Square") for part in attack.get("attacks", [])]
        return f"{name} ({', '.join(parts)})" if parts else name
    if name == "fgsm":
        return "FGSM"
    if name == "pgd":
        restarts = int(attack.get("restarts") or 1)
        return f"PGD-{attack.get('steps')}, {restarts} restart{'s' if restarts != 1 else ''}"
    return name


def attack_sentence(attack: Mapping[str, Any], num_samples: int | None = None) -> str:
    """One sentence saying what the card's robust accuracy measures: the attack, the budget, the worst case."""
    name = str(attack.get("name") or "")
    samples = f"the {num_samples} held-out samples" if num_samples else "the held-out samples"
    if name.lower().startswith("autoattack"):
        how = (
            "with fewer iterations than AutoAttack's standard set"
            if attack.get("version") == "quick"
            else "AutoAttack's standard set, as RobustBench runs it"
        )
        attacker = f"{name} (torchattacks' APGD-CE, APGD-T, FAB-T and Square, {how})"
        worst = "a sample counts as fooled when any one of the four attacks fools it"
    elif name == "pgd":
        restarts = int(attack.get("restarts") or 1)
        loss = "the answer-token loss" if "answer" in str(attack.get("description", "")) else "the task loss"
        attacker = f"PGD with {attack.get('steps')} steps and {restarts} random restart{'s' if restarts != 1 else ''} on {loss}"
        worst = "a sample counts as fooled when any restart fools it"
    elif name == "fgsm":
        attacker, worst = "a single FGSM step", "one attack per sample"
    else:
        attacker = str(attack.get("description") or name or "an unnamed attack")
        worst = "per-sample worst case"
    norm = attack.get("norm", "linf")
    budget = (
        "may move every pixel by at most ε"
        if norm == "linf"
        else f"may change each image by an {_NORM_NAMES.get(norm, norm)} distance of at most ε"
    )
    return (
        f"Robust accuracy is the share of {samples} still predicted correctly when {attacker} {budget} "
        f"(ε in [0, 1] pixel units, per column of the table); {worst}."
    )


def _dataset_of(datasets: list[str] | None, metrics: Mapping[str, Any]) -> tuple[str, str]:
    """(`dataset.type`, `dataset.name`) of the evaluation: a Hub id, the built-in synthetic data, or "local"."""
    named = [name for name in (datasets or []) if name]
    if not named:
        return "local", "a held-out split of the training data"
    name = named[0]
    if name == "synthetic":
        task = metrics.get("synthetic_task")
        detail = f", task {task}" if task else ""
        return "synthetic", f"ran_peft's synthetic medical images (procedural{detail})"
    if _is_local_path(name):
        return "local", "a local dataset (held-out split)"
    return name, name


def robustness_eval_results(
    metrics: Mapping[str, Any],
    *,
    task_type: str = "image-classification",
    datasets: list[str] | None = None,
) -> list[EvalResult]:
    """The adapter's clean and robust accuracies (in %) as `huggingface_hub.EvalResult`s for the card's
    `model-index`: one per budget, each with the attack, the norm and the budget written out.

    The adapter's run is `metrics["runs"]["ran"]` (else the only or the last run; `metrics` itself when it has
    no `runs`), as `ran_metrics.json` holds it.
    """
    _, run = _adapter_run(metrics)
    attack = _attack_of(metrics)
    dataset_type, dataset_name = _dataset_of(datasets, metrics)
    common = dict(
        task_type=task_type,
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split="held-out evaluation rows",
    )
    results = []
    if run.get("clean_accuracy") is not None:
        results.append(
            EvalResult(
                **common,
                metric_type="accuracy",
                metric_value=round(100 * float(run["clean_accuracy"]), 1),
                metric_name="clean accuracy",
            )
        )
    norm = str(attack.get("norm", "linf"))
    label = attack_label(attack)
    for budget, value in run.get("robust_accuracy", {}).items():
        results.append(
            EvalResult(
                **common,
                metric_type="accuracy",
                metric_value=round(100 * float(value), 1),
                metric_name=f"robust accuracy, {_NORM_NAMES.get(norm, norm)} {budget}, {label}",
                metric_config=f"{norm} {budget}",
                metric_args={
                    "attack": str(attack.get("name", "")),
                    "norm": norm,
                    "epsilon": str(budget),
                    "pixel_units": "[0, 1]",
                    **({"num_samples": int(run["num_samples"])} if run.get("num_samples") else {}),
                },
            )
        )
    return results


def model_card(
    config: RANConfig,
    *,
    base_model: str | None,
    metrics: Mapping[str, Any] | None = None,
    datasets: list[str] | None = None,
    task_type: str = "image-classification",
) -> ModelCard:
    """The adapter's card: YAML metadata (`base_model` when it is a Hub id, `model-index` with the clean and
    robust accuracies), the recipe, a clean/robust accuracy table and one sentence saying what was attacked how.

    `task_type` is the `model-index` task (`TASK_TYPES` maps model families to it).
    """
    base_model = hub_model_id(base_model)
    eval_results = robustness_eval_results(metrics, task_type=task_type, datasets=datasets) if metrics else []
    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        tags=["ran-peft", "lora", "adversarial-robustness", "medical-imaging", "vision-language"],
        datasets=[name for name in (datasets or []) if not _is_local_path(name)] or None,
        pipeline_tag=None,
        model_name=f"RAN adapter for {base_model}" if base_model else "RAN adapter",
        eval_results=eval_results or None,
    )
    recipe = config.recipe_dict()
    recipe_rows = "\n".join(f"| `{name}` | `{json.dumps(value)}` |" for name, value in sorted(recipe.items()))
    sections = [
        "# RAN adapter",
        "",
        f"A LoRA adapter{f' for `{base_model}`' if base_model else ''} trained with RAN (Rectify Adversarial Noise) "
        "using [`ran_peft`](https://pypi.org/project/ran-peft/). At inference it is a plain LoRA adapter: load it "
        "with `peft.PeftModel.from_pretrained` (no `ran_peft` needed), or with `ran_peft.load_adapter` to restore "
        "the training recipe too.",
        "",
        "The RAN recipe here is `ran_peft`'s own, built from the public description of the paper (Han et al., "
        "Findings of EMNLP 2024); the paper's exact loss is not public, so nothing here reproduces its numbers.",
        "",
    ]
    if metrics:
        sections += ["## Robustness", "", _metrics_table(metrics), ""]
    sections += [
        "## Recipe",
        "",
        f"LoRA rank {config.r}, alpha {config.lora_alpha}, target modules `{_target_modules(config)}`.",
        "",
        "| field | value |",
        "| --- | --- |",
        recipe_rows,
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        "model = PeftModel.from_pretrained(base_model, adapter_repo_id)  # plain LoRA at inference",
        "```",
    ]
    return ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(sections) + "\n"
    )


def model_card_text(
    config: RANConfig,
    *,
    base_model: str | None,
    metrics: Mapping[str, Any] | None = None,
    datasets: list[str] | None = None,
    task_type: str = "image-classification",
) -> str:
    """The adapter's `README.md`, as `model_card` builds it."""
    return str(
        model_card(config, base_model=base_model, metrics=metrics, datasets=datasets, task_type=task_type)
    )


def _target_modules(config: RANConfig) -> str:
    modules = config.target_modules
    if isinstance(modules, (set, list, tuple)):
        return ", ".join(sorted(modules))
    return str(modules)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown tables from `ran_metrics.json`: one row per evaluated model (e.g. before/after, lora/ran) and the
    sentence that says what the robust columns measure; for generative VLMs also the greedy generated answers on the
    same adversarial images, and the open questions."""
    runs = metrics.get("runs", {"adapter": metrics})
    lines = _accuracy_table(runs, lambda run: run)
    attack = _attack_of(metrics)
    if attack:
        lines += ["", attack_sentence(attack, _adapter_run(metrics)[1].get("num_samples"))]
    if any("generation" in run for run in runs.values()):
        description = next(run["generation"]["description"] for run in runs.values() if "generation" in run)
        lines += ["", f"Generated answers ({description}):", ""]
        lines += _accuracy_table(runs, lambda run: run.get("generation"))
    if any("open_questions" in run for run in runs.values()):
        opened = next(run["open_questions"] for run in runs.values() if "open_questions" in run)
        lines += ["", f"Open questions ({opened['attack'].get('description', '')}):", ""]
        lines += _accuracy_table(runs, lambda run: run.get("open_questions"))
    return "\n".join(lines)


def _accuracy_table(runs: Mapping[str, Any], pick) -> list[str]:
    chosen = {name: pick(run) for name, run in runs.items() if pick(run) is not None}
    epsilons: list[str] = []
    for run in chosen.values():
        for key in run.get("robust_accuracy", {}):
            if key not in epsilons:
                epsilons.append(key)
    header = "| model | clean | " + " | ".join(f"robust @ {key}" for key in epsilons) + " |"
    lines = [header, "|" + " --- |" * (2 + len(epsilons))]
    for name, run in chosen.items():
        robust = run.get("robust_accuracy", {})
        cells = [f"{100 * robust[key]:.1f}" if key in robust else "-" for key in epsilons]
        clean = run.get("clean_accuracy")
        lines.append(
            f"| {name} | {'-' if clean is None else f'{100 * clean:.1f}'} | " + " | ".join(cells) + " |"
        )
    return lines


def save_adapter(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    metrics: Mapping[str, Any] | None = None,
    datasets: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the adapter, `ran_metrics.json` and the model card into `output_dir`, all or nothing.

    Everything is written into a temporary folder beside `output_dir` and moved into place at the end, so a failure
    leaves no half-written adapter. An existing adapter in `output_dir` is only replaced with `overwrite=True`.
    """
    output_dir = Path(output_dir)
    if (output_dir / "adapter_config.json").exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds an adapter; pass overwrite=True (or another folder) to replace it."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        config = _ran_config_of(model)
        if metrics is not None:
            (staging / METRICS_NAME).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        base_model = getattr(config, "base_model_name_or_path", None)
        (staging / "README.md").write_text(
            model_card_text(
                config,
                base_model=base_model,
                metrics=metrics,
                datasets=datasets,
                task_type=_task_type(model),
            )
        )
        for name in ADAPTER_FILES:
            if not (staging / name).exists():
                raise RuntimeError(f"saving the adapter wrote no {name}: is this a RAN (PEFT) model?")
        if output_dir.exists():
            for item in staging.iterdir():
                target = output_dir / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
            staging.rmdir()
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _task_type(model: Any) -> str:
    """The `model-index` task of the model's family (image classification unless it is a generative VLM)."""
    from ran_peft.families import UnsupportedModelError, detect_family

    try:
        return TASK_TYPES.get(detect_family(model).name, "image-classification")
    except (UnsupportedModelError, TypeError, ValueError):
        return "image-classification"


def _ran_config_of(model: Any) -> RANConfig:
    configs = getattr(model, "peft_config", {})
    active = getattr(model, "active_adapter", "default")
    config = configs.get(active if isinstance(active, str) else active[0])
    if not isinstance(config, RANConfig):
        raise TypeError(
            f"the model's active adapter is not a RAN adapter (its config is {type(config).__name__})."
        )
    return config


def stage_for_push(folder: str | os.PathLike) -> Path:
    """A copy of the adapter folder fit to publish: only the adapter's own files, no local path of the user.

    `base_model_name_or_path` in `adapter_config.json` is cleared when it names a local folder.
    """
    folder = Path(folder)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete RAN adapter: missing {missing}.")
    staging = Path(tempfile.mkdtemp(prefix="ran-peft-push-"))
    for name in (*ADAPTER_FILES, "README.md", METRICS_NAME):
        if (folder / name).is_file():
            shutil.copy2(folder / name, staging / name)
    adapter_config_path = staging / "adapter_config.json"
    adapter_config = json.loads(adapter_config_path.read_text())
    if _is_local_path(adapter_config.get("base_model_name_or_path")):
        adapter_config["base_model_name_or_path"] = None
        adapter_config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return staging


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload RAN adapter",
) -> str:
    """Upload a saved adapter folder to the Hub (created if needed). Returns the commit URL.

    On failure the local folder is untouched and `HubPushError` says where it is; the token is never logged.
    """
    from huggingface_hub import HfApi

    staging = stage_for_push(folder)
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(staging), repo_id=repo_id, repo_type="model", commit_message=commit_message
        )
        return str(getattr(commit, "commit_url", commit))
    except Exception as error:
        reason = str(error)
        if token:
            reason = reason.replace(token, "***")
        raise HubPushError(
            f"push of the adapter to '{repo_id}' failed ({type(error).__name__}: {reason}); everything is still "
            f"saved locally in {Path(folder).resolve()}."
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_no_matching_module_error(error: Exception) -> bool:
    """PEFT's error for an adapter whose target modules the model does not have: `NoMatchingPeftModuleError` (a
    ValueError) from peft 0.21 on, a ValueError with this message before."""
    try:
        from peft.utils.error import NoMatchingPeftModuleError
    except ImportError:  # peft < 0.21
        return "not found in the base model" in str(error) or "No modules were targeted" in str(error)
    return isinstance(error, NoMatchingPeftModuleError)


class AdapterLoadError(ValueError):
    """An adapter cannot be loaded safely and exactly; the message names the file or the modules at fault."""


def _adapter_weights_file(adapter: str, subfolder: str | None, hub_kwargs: Mapping[str, Any]) -> str:
    """The adapter's `adapter_model.safetensors` (local folder or Hub repo); a pickle-only adapter is refused."""
    folder = os.path.join(adapter, subfolder) if subfolder else adapter
    if os.path.isdir(folder):
        path = os.path.join(folder, SAFE_WEIGHTS_NAME)
        if os.path.isfile(path):
            return path
        if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_NAME)):
            raise AdapterLoadError(
                f"{folder} holds only {PICKLE_WEIGHTS_NAME}, a pickle file that can run code when loaded; ran_peft "
                f"loads weights only from {SAFE_WEIGHTS_NAME}. If you trust its source, convert it once: "
                "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')`."
            )
        raise AdapterLoadError(f"{folder} holds no {SAFE_WEIGHTS_NAME}: it is not a saved adapter folder.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    allowed = {"revision", "cache_dir", "token", "local_files_only", "force_download"}
    try:
        return hf_hub_download(
            adapter,
            SAFE_WEIGHTS_NAME,
            subfolder=subfolder,
            **{k: v for k, v in hub_kwargs.items() if k in allowed},
        )
    except EntryNotFoundError as error:
        raise AdapterLoadError(
            f"the Hub repo {adapter!r} has no {SAFE_WEIGHTS_NAME} (or it is not in the local cache when offline); "
            f"ran_peft never loads pickle weights ({PICKLE_WEIGHTS_NAME})."
        ) from error


def _safetensors_keys(path: str) -> set[str]:
    """The tensor names in a safetensors file; a corrupted or truncated file is an error that names it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise AdapterLoadError(
            f"{path} ({size} bytes) is not a readable safetensors file ({error}): it is corrupted or truncated (an "
            "interrupted download, copy or save?). Download or save the adapter again."
        ) from error


def _describe(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def load_adapter(
    base_model: Any,
    adapter: str | os.PathLike,
    *,
    is_trainable: bool = False,
    strict: bool = True,
    adapter_name: str = "default",
    **kwargs: Any,
):
    """Load a RAN adapter (a folder or a Hub repo id) on `base_model` with its recipe restored as a `RANConfig`.

    Safer and stricter than stock `PeftModel.from_pretrained`:
    - weights come only from `adapter_model.safetensors`; a folder or repo with only the pickle
      `adapter_model.bin` is refused (stock PEFT would unpickle it);
    - a corrupted or truncated weights file is an `AdapterLoadError` that names the file (stock PEFT raises
      safetensors' own `SafetensorError`, which names no file);
    - with `strict=True` (default), an adapter made for another base model is an `AdapterLoadError` naming the
      adapter weights the model has no place for and the model's adapter weights the file lacks (stock PEFT only
      warns about the missing ones and silently drops the unexpected ones). On that error the LoRA layers are
      already in `base_model`: load a fresh base model to try again. `strict=False` keeps PEFT's behaviour.
    - `ran_config.json` keys from a newer `ran_peft` are dropped with a warning (see `RANConfig.from_pretrained`).
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    adapter = str(adapter)
    subfolder = kwargs.get("subfolder")
    weights_file = _adapter_weights_file(adapter, subfolder, kwargs)
    saved_keys = _safetensors_keys(weights_file)
    config = RANConfig.from_pretrained(
        adapter, **{k: v for k, v in kwargs.items() if k in ("revision", "subfolder")}
    )
    base_name = (
        getattr(getattr(base_model, "config", None), "name_or_path", None) or type(base_model).__name__
    )
    trained_on = config.base_model_name_or_path or "an unrecorded base model"
    try:
        with warnings.catch_warnings():
            if strict:  # the error below says the same, with the unexpected weights too
                warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(
                base_model,
                adapter,
                config=config,
                is_trainable=is_trainable,
                adapter_name=adapter_name,
                **kwargs,
            )
    except ValueError as error:
        if not _is_no_matching_module_error(error):
            raise
        raise AdapterLoadError(
            f"the adapter {adapter!r} (trained on {trained_on}) targets modules {_target_modules(config)!r} that "
            f"{base_name} does not have: it was made for another base model."
        ) from error
    if strict:
        expected = set(
            get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        )
        # Base weights (e.g. resized embeddings) may be saved beside the adapter: they are not unexpected.
        present = set(model.state_dict())
        unexpected = sorted(key for key in saved_keys - expected if key not in present)
        missing = sorted(expected - saved_keys)
        problems = []
        if unexpected:
            problems.append(
                f"unexpected adapter weights (no such module in this model): {_describe(unexpected)}"
            )
        if missing:
            problems.append(
                f"missing adapter weights (modules of this model the file has none for): {_describe(missing)}"
            )
        if problems:
            raise AdapterLoadError(
                f"the adapter {adapter!r} (trained on {trained_on}) does not fit {base_name}: "
                + "; ".join(problems)
                + ". Load it on the base model it was trained for, or pass strict=False to load what fits."
            )
    return model
