"""`RANCallback`: with it in `callbacks=[...]`, the stock `transformers.Trainer` trains RAN.

Thin glue: it wraps the model's forward with `RANTrainingWrapper` for the length of training, keeps the noise
warm-up in step with the Trainer, and puts the loss parts into the Trainer's logs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from ran_peft.config import RANConfig
from ran_peft.families import detect_family
from ran_peft.pixel_layout import PixelLayout
from ran_peft.pixels import PixelBox
from ran_peft.quantization import explain_four_bit_cpu_path
from ran_peft.training import RANTrainingWrapper, resolve_pixel_box


def find_ran_config(model: torch.nn.Module) -> RANConfig | None:
    """The `RANConfig` of the model's active adapter, if it has one."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping):
        return None
    active = getattr(model, "active_adapter", None)
    names = active if isinstance(active, (list, tuple)) else [active]
    for name in names:
        config = peft_config.get(name)
        if isinstance(config, RANConfig):
            return config
    return None


class RANCallback(TrainerCallback):
    """Train RAN with the stock `transformers.Trainer`.

    Args:
        config: the recipe. Default: the `RANConfig` the model was made with (`get_peft_model(model, RANConfig())`).
        pixel_box: the pixel normalisation. Default: the config's `image_mean`/`image_std`, else the Trainer's
            `processing_class` (an image processor or a multi-modal processor), else the model's own (open_clip's
            `visual.preprocess_cfg`).
        class_text_inputs: for dual encoders trained as prompt-based classifiers, the tokenised class prompts
            (`input_ids`, `attention_mask`; one row per class, in label order).
        pixel_layout: where the channels and padding of `pixel_values` are (a name of
            `ran_peft.pixel_layout.PIXEL_LAYOUTS` or a `PixelLayout`). Default: the config's `pixel_layout`
            (`"auto"`: recognised from each batch and the `processing_class`'s attributes).

    The loss parts (`ran/clean`, `ran/adversarial`, `ran/kl`, ...) are averaged between logging steps and added to
    the Trainer's logs and `state.log_history`. It serves TRL's `SFTTrainer` too (`ran_peft/trl.py`).
    """

    def __init__(
        self,
        config: RANConfig | None = None,
        pixel_box: PixelBox | None = None,
        class_text_inputs: Mapping[str, torch.Tensor] | None = None,
        pixel_layout: str | PixelLayout | None = None,
    ):
        self.config = config
        self.pixel_box = pixel_box
        self.class_text_inputs = class_text_inputs
        self.pixel_layout = pixel_layout
        self.wrapper: RANTrainingWrapper | None = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            raise ValueError(
                "RANCallback needs the Trainer's model (the Trainer passes it to its callbacks)."
            )
        config = self.config or find_ran_config(model)
        if config is None:
            raise ValueError(
                "RANCallback found no RANConfig: build the model with `get_peft_model(model, RANConfig(...))` or pass "
                "`RANCallback(config=RANConfig(...))`."
            )
        # A model RAN cannot attack is refused for what it is before anything is asked of its processor.
        detect_family(model, self.class_text_inputs)
        box = self.pixel_box or resolve_pixel_box(config, processing_class, model)
        explain_four_bit_cpu_path(model)
        self.wrapper = RANTrainingWrapper(
            model, config, box, self.class_text_inputs, self.pixel_layout, processor=processing_class
        )
        self.wrapper.step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.wrapper is not None:
            self.wrapper.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.wrapper is None or logs is None or "loss" not in logs:
            return
        parts = self.wrapper.pop_logged_parts()
        logs.update(parts)
        # The Trainer appended a copy of `logs` to the history before calling us: keep the two the same.
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(parts)

    def on_train_end(self, args, state, control, **kwargs):
        if self.wrapper is not None:
            self.wrapper.remove()
            self.wrapper = None
