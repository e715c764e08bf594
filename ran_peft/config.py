"""`RANConfig`: every knob of the RAN recipe, on top of PEFT's `LoraConfig`.

RAN trains a plain LoRA adapter, so the config is a `LoraConfig` (`peft_type` LORA): `get_peft_model` builds the
adapter, and the saved adapter loads in stock PEFT. The recipe's own fields are saved beside the adapter in
`ran_config.json`, so stock PEFT never sees a key it does not know and `RANConfig.from_pretrained` restores it all.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from peft import LoraConfig

from ran_peft.pixel_layout import PIXEL_LAYOUTS

RAN_CONFIG_NAME = "ran_config.json"
"""The file beside `adapter_config.json` that holds the recipe (stock PEFT never reads it)."""

_LORA_FIELD_NAMES = frozenset(f.name for f in fields(LoraConfig))


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"RANConfig.{name}={value!r} is not allowed: {allowed}.")


@dataclass
class RANConfig(LoraConfig):
    """The RAN recipe (see `RAN_RECIPE.md`): LoRA underneath, adversarial training and rectification on top.

    The loss of one batch is
    `task_weight * ((1 - adversarial_weight) * L_task(x) + adversarial_weight * L_task(x + delta))
    + kl_weight * KL(p(x) || p(x + delta)) + reference_kl_weight * KL(p_0(x + delta) || p(x + delta))
    + consistency_weight * |z(x + delta) - z_0(x)|^2
    + covariance_weight * offdiag(cov z(x)) + spectrum_weight * (1 - top-k spectrum share of z(x))`,
    where `delta` is made by PGD inside the budget. With `epsilon=0` and every weight 0, RAN is LoRA training.
    Budgets are in [0, 1] pixel units, converted per channel with the image processor's mean and std.
    Every default stands on a measured ablation (the benchmarks guide: `benchmarks/robustness.py` term ablations).
    """

    epsilon: float = field(
        default=4 / 255,
        metadata={"help": "L-inf (or L2) attack budget in [0, 1] pixel units; 0 turns the attack off."},
    )
    step_size: float | None = field(
        default=None,
        metadata={
            "help": "Attack step in pixel units. None: 1.25*epsilon for one step (fast adversarial training), "
            "else 2.5*epsilon/attack_steps."
        },
    )
    attack_steps: int = field(default=1, metadata={"help": "Number of PGD steps K per batch (>= 1)."})
    attack_norm: Literal["linf", "l2"] = field(default="linf", metadata={"help": "Norm of the attack ball."})
    random_start: bool = field(
        default=True, metadata={"help": "Start the attack at a uniform random point of the budget ball."}
    )
    free_start: bool = field(
        default=True,
        metadata={
            "help": "Take the first attack step from the input gradient of the clean pass, whose backward also "
            "gives the clean loss's parameter gradients, so one attack step costs about one extra forward/backward."
        },
    )
    attack_loss: Literal["task", "kl", "consistency"] = field(
        default="task",
        metadata={
            "help": "What the attack maximises: the task loss, the KL to the clean prediction (TRADES), or the "
            "distance of the image features to the adapter-disabled model's clean features (FARE)."
        },
    )
    task_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the task-loss terms (the clean/adversarial mix); 0 trains on the rectification "
            "terms alone (FARE's unsupervised recipe)."
        },
    )
    adversarial_weight: float = field(
        default=0.5,
        metadata={"help": "Mix weight w in [0, 1]: (1-w) * clean task loss + w * adversarial task loss."},
    )
    kl_weight: float = field(
        default=1.0,
        metadata={"help": "Weight beta of KL(p_clean || p_adversarial), the prediction rectifier."},
    )
    reference_kl_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of KL(p_0(x+delta) || p(x+delta)): the adversarial prediction pulled to the "
            "adapter-disabled (pre-trained) model's prediction on the same input, as PMG-AFT does (costs one extra "
            "no-grad forward)."
        },
    )
    kl_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term (> 0)."})
    consistency_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of |z(x+delta) - stopgrad(z_0(x))|^2: adversarial image features pulled to the clean "
            "features of the adapter-disabled model (costs one extra no-grad forward)."
        },
    )
    covariance_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the off-diagonal batch covariance of clean image features (decorrelation)."
        },
    )
    spectrum_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of 1 - (share of the top `spectrum_top_k` singular values of the features)."
        },
    )
    spectrum_top_k: int = field(
        default=4, metadata={"help": "How many top singular values the spectrum term keeps up (>= 1)."}
    )
    noise_warmup_steps: int = field(
        default=0,
        metadata={"help": "Steps over which epsilon and kl_weight ramp linearly from 0 to their targets."},
    )
    text_epsilon: float = field(
        default=0.0,
        metadata={
            "help": "L-inf budget of a perturbation of the text token embeddings (embedding units), attacked jointly "
            "with the image; 0 turns the text attack off."
        },
    )
    text_step_size: float | None = field(
        default=None, metadata={"help": "Text attack step; None uses the same rule as `step_size`."}
    )
    adversarial_batch_statistics: Literal["batch_only", "update_running"] = field(
        default="batch_only",
        metadata={
            "help": "What the adversarial training pass does with BatchNorm-style layers (training mode): "
            "'batch_only' normalises with the adversarial batch's own statistics and leaves the running "
            "statistics to the clean pass (what inference uses describes clean data); 'update_running' also "
            "folds the adversarial batch into the running statistics. The attack's own passes always use the "
            "running statistics and update nothing. Chosen by `benchmarks/batchnorm_statistics.py`."
        },
    )
    attack_every: int = field(
        default=1,
        metadata={
            "help": "Attack on every k-th optimiser step only (1: every step). The other steps are plain clean steps "
            "(the task loss and the terms that need no attack), so a step costs on average 1 + (c - 1) / k LoRA "
            "steps, where c is the cost of an attacked step."
        },
    )
    adversarial_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share of each batch that is attacked and gets the adversarial pass, in (0, 1]: the samples "
            "with the smallest clean margin (closest to the decision boundary, as in BulletTrain), at least one. "
            "The adversarial terms are means over those samples. Needs per-sample class logits (image classifiers, "
            "dual encoders with class prompts) and a batch whose inputs all have the samples on their first axis."
        },
    )
    carry_perturbations: bool = field(
        default=False,
        metadata={
            "help": "Keep each sample's perturbation and start its next attack from it (ATTA: the attack "
            "accumulates across epochs) instead of from a random point. Samples are recognised by their pixels; "
            "the perturbations are kept in half precision on the CPU (about half the size of the images seen). "
            "Needs a batch whose inputs all have the samples on their first axis."
        },
    )
    free_replay: int = field(
        default=1,
        metadata={
            "help": "Free adversarial training (Shafahi et al. 2019): replay each batch this many optimiser steps, "
            "one forward/backward each. The first replay is the clean step; each later one trains on the batch "
            "perturbed by the previous backward's input gradient (adversarial task loss, plus the KL to the "
            "predictions cached from the clean replay). As in Free AT the perturbation starts at the clean batch "
            "and `random_start` does not apply (a random start lowered Free AT's robust accuracy in the "
            "benchmarks). The batches that arrive during a replay are not used, so "
            "the number of distinct batches falls by this factor, as in Free AT at the cost of natural training. "
            "1: off."
        },
    )
    adversarial_pass: Literal["model", "image_features"] = field(
        default="model",
        metadata={
            "help": "What the attack and the adversarial pass run: 'model' (the whole model) or 'image_features' "
            "(the vision tower and projector only, through the model's `get_image_features`, FARE-style: the "
            "consistency term pulls the adversarial image features back to the adapter-disabled model's clean ones, "
            "and the language model sees only the clean pass). The attack maximises that feature distance "
            "(attack_loss='consistency') or takes its one step from the clean task loss's input gradient "
            "(attack_loss='task', with free_start=True and attack_steps=1). 'image_features' needs "
            "consistency_weight > 0, kl_weight=0 and adversarial_weight=0."
        },
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-channel pixel mean of the inputs. None: read from the processor at training time."
        },
    )
    image_std: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-channel pixel std of the inputs. None: read from the processor at training time."
        },
    )
    pixel_layout: str = field(
        default="auto",
        metadata={
            "help": "Where the channels and the padding of `pixel_values` are: 'auto' (recognised from the batch's "
            "keys and shapes and the processor's attributes), 'channels_first' ((..., C, H, W) images, padding from "
            "a (..., H, W) `pixel_attention_mask`), 'patch_rows' ((N, C*T*P*P) rows with `image_grid_thw`, Qwen2-VL "
            "style) or 'patch_sequence' ((B, N, P*P*C) NaFlex patches with a (B, N) `pixel_attention_mask`, SigLIP2 "
            "style). See `ran_peft/pixel_layout.py`."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_recipe()

    def _validate_recipe(self) -> None:
        def finite(name: str, low: float = 0.0, high: float = math.inf, allowed: str | None = None) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not low <= value <= high:
                _fail(name, value, allowed or f"a number in [{low}, {high}]")

        finite("epsilon", 0.0, 1.0, "a budget in [0, 1] pixel units (4/255 is a common choice)")
        if self.step_size is not None:
            finite("step_size", 0.0, 1.0, "None or a step in [0, 1] pixel units")
        for name in ("attack_steps", "spectrum_top_k", "attack_every", "free_replay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "an integer >= 1")
        if isinstance(self.noise_warmup_steps, bool) or not isinstance(self.noise_warmup_steps, int):
            _fail("noise_warmup_steps", self.noise_warmup_steps, "an integer >= 0")
        if self.noise_warmup_steps < 0:
            _fail("noise_warmup_steps", self.noise_warmup_steps, "an integer >= 0")
        if self.attack_norm not in ("linf", "l2"):
            _fail("attack_norm", self.attack_norm, "'linf' or 'l2'")
        if self.attack_loss not in ("task", "kl", "consistency"):
            _fail("attack_loss", self.attack_loss, "'task', 'kl' or 'consistency'")
        if self.adversarial_batch_statistics not in ("batch_only", "update_running"):
            _fail(
                "adversarial_batch_statistics",
                self.adversarial_batch_statistics,
                "'batch_only' or 'update_running'",
            )
        for name in ("random_start", "free_start", "carry_perturbations"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        finite("adversarial_weight", 0.0, 1.0)
        finite("adversarial_fraction", 0.0, 1.0, "a share of the batch in (0, 1]")
        if self.adversarial_fraction == 0:
            _fail("adversarial_fraction", self.adversarial_fraction, "a share of the batch in (0, 1]")
        if self.adversarial_pass not in ("model", "image_features"):
            _fail("adversarial_pass", self.adversarial_pass, "'model' or 'image_features'")
        for name in (
            "kl_weight",
            "task_weight",
            "reference_kl_weight",
            "consistency_weight",
            "covariance_weight",
            "spectrum_weight",
            "text_epsilon",
        ):
            finite(name)
        if self.text_step_size is not None:
            finite("text_step_size")
        finite("kl_temperature", 1e-6, math.inf, "a temperature > 0")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0:
                _fail(name, value, "None or a non-empty list of per-channel numbers")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                _fail(name, value, "None or a list of finite numbers")
            setattr(self, name, [float(v) for v in value])
        if self.image_std is not None and any(v <= 0 for v in self.image_std):
            _fail("image_std", self.image_std, "positive numbers")
        if self.pixel_layout not in PIXEL_LAYOUTS:
            _fail(
                "pixel_layout", self.pixel_layout, "one of " + ", ".join(repr(name) for name in PIXEL_LAYOUTS)
            )
        if (self.image_mean is None) != (self.image_std is None):
            _fail("image_mean", self.image_mean, "set together with image_std (both or neither)")
        self._validate_light_weight_recipes()

    def _validate_light_weight_recipes(self) -> None:
        """The settings that change which passes a step runs must not contradict each other."""
        if self.adversarial_pass == "image_features":
            if self.attack_loss == "task":
                # The one attack step is the free start's: the input gradient of the clean pass's task loss. A further
                # step would need the task loss at the adversarial input, through the language model.
                self._require(
                    "adversarial_pass='image_features' and attack_loss='task' (the one attack step is the free "
                    "start's input gradient of the clean task loss; more would run the language model on the "
                    "adversarial input)",
                    ("free_start", "True", self.free_start),
                    ("attack_steps", "1", self.attack_steps == 1),
                )
            self._require(
                "adversarial_pass='image_features' (its adversarial pass gives image features only, no task loss or "
                "predictions)",
                ("attack_loss", "'consistency' or 'task'", self.attack_loss in ("consistency", "task")),
                ("consistency_weight", "a weight > 0", self.consistency_weight > 0),
                ("kl_weight", "0", self.kl_weight == 0),
                ("adversarial_weight", "0", self.adversarial_weight == 0),
                ("reference_kl_weight", "0", self.reference_kl_weight == 0),
                ("text_epsilon", "0", self.text_epsilon == 0),
            )
        if self.free_replay > 1:
            self._require(
                "free_replay > 1 (each replay is one forward/backward whose input gradient makes the next replay's "
                "perturbation)",
                ("attack_every", "1", self.attack_every == 1),
                ("adversarial_fraction", "1.0", self.adversarial_fraction == 1.0),
                ("carry_perturbations", "False", not self.carry_perturbations),
                ("adversarial_pass", "'model'", self.adversarial_pass == "model"),
                ("text_epsilon", "0", self.text_epsilon == 0),
                ("attack_loss", "'task'", self.attack_loss == "task"),
                ("consistency_weight", "0", self.consistency_weight == 0),
                ("reference_kl_weight", "0", self.reference_kl_weight == 0),
            )

    def _require(self, setting: str, *rules: tuple[str, str, bool]) -> None:
        """Fail on the first `(field, wanted, ok)` rule that does not hold: the field must be `wanted` with `setting`."""
        for name, wanted, ok in rules:
            if not ok:
                _fail(name, getattr(self, name), f"{wanted} with {setting}")

    # -- derived values ------------------------------------------------------------------------------------------

    @property
    def resolved_step_size(self) -> float:
        """The attack step in pixel units (the rule of `step_size=None` applied)."""
        return (
            self.step_size if self.step_size is not None else _default_step(self.epsilon, self.attack_steps)
        )

    @property
    def resolved_text_step_size(self) -> float:
        """The text-embedding attack's step (the rule of `text_step_size=None` applied)."""
        if self.text_step_size is not None:
            return self.text_step_size
        return _default_step(self.text_epsilon, self.attack_steps)

    @property
    def attacks(self) -> bool:
        """Whether RAN makes adversarial examples at all (a budget on the image or on the text)."""
        return self.epsilon > 0 or self.text_epsilon > 0

    def ramp(self, step: int) -> float:
        """The share of the noise targets in force at optimiser step `step` (0-based): linear warm-up to 1."""
        if self.noise_warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.noise_warmup_steps)

    def recipe_dict(self) -> dict[str, Any]:
        """The RAN fields alone (what `ran_config.json` holds)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _LORA_FIELD_NAMES}

    def to_lora_config(self) -> LoraConfig:
        """The plain `LoraConfig` of the adapter: what inference and stock PEFT need."""
        return LoraConfig(**{f.name: getattr(self, f.name) for f in fields(LoraConfig) if f.init})

    # -- saving and loading --------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write `adapter_config.json` as plain LoRA (stock PEFT reads it) and `ran_config.json` beside it."""
        lora = self.to_lora_config()
        lora.peft_type = self.peft_type
        lora.base_model_name_or_path = self.base_model_name_or_path
        lora.revision = self.revision
        lora.inference_mode = self.inference_mode
        lora.save_pretrained(save_directory, **kwargs)
        from ran_peft.version import __version__

        payload = {"ran_peft_version": __version__, **self.recipe_dict()}
        _write_json_atomically(os.path.join(save_directory, RAN_CONFIG_NAME), payload)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load the LoRA part with PEFT (a folder or a Hub repo id) and the recipe from `ran_config.json`.

        Keys of `ran_config.json` this version does not know (a file from a newer `ran_peft`) are dropped with a
        warning; an adapter without `ran_config.json` gets the default recipe, with a warning.
        """
        lora = LoraConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        lora_values = {f.name: getattr(lora, f.name) for f in fields(LoraConfig) if f.init}
        recipe = _read_recipe(pretrained_model_name_or_path, subfolder, kwargs)
        known = {f.name for f in fields(cls) if f.init and f.name not in _LORA_FIELD_NAMES}
        recipe.pop("ran_peft_version", None)
        unknown = sorted(set(recipe) - known)
        if unknown:
            warnings.warn(
                f"{RAN_CONFIG_NAME} has keys this version of ran_peft does not know: {unknown}; they are ignored. "
                "The adapter was probably saved by a newer ran_peft.",
                stacklevel=2,
            )
        config = cls(**lora_values, **{k: v for k, v in recipe.items() if k in known})
        for name in ("peft_type", "base_model_name_or_path", "revision", "inference_mode"):
            setattr(config, name, getattr(lora, name))
        return config


def _default_step(epsilon: float, steps: int) -> float:
    return 1.25 * epsilon if steps == 1 else 2.5 * epsilon / steps


def _read_recipe(path: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    folder = os.path.join(path, subfolder) if subfolder else path
    local = os.path.join(folder, RAN_CONFIG_NAME)
    if os.path.isdir(folder):
        file = local if os.path.isfile(local) else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        allowed = {"revision", "cache_dir", "token", "local_files_only", "force_download"}
        try:
            file = hf_hub_download(
                path,
                RAN_CONFIG_NAME,
                subfolder=subfolder,
                **{k: v for k, v in hub_kwargs.items() if k in allowed},
            )
        except EntryNotFoundError:
            file = None
    if file is None:
        warnings.warn(
            f"no {RAN_CONFIG_NAME} at {path!r}: this is a plain LoRA adapter; the default RAN recipe is used.",
            stacklevel=3,
        )
        return {}
    with open(file) as handle:
        try:
            recipe = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON ({error}); the recipe cannot be restored.") from error
    if not isinstance(recipe, dict):
        raise ValueError(f"{file} must hold a JSON object of RAN fields, got {type(recipe).__name__}.")
    return recipe


def _write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(temporary, path)
