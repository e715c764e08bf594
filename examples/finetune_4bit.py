"""QLoRA-style RAN: a dual encoder (CLIP, SigLIP) loaded in 4-bit nf4, prepared for k-bit training, fine-tuned with
RAN through the stock `transformers.Trainer` on the synthetic downstream task; prints the memory footprint
against fp32 and the clean/robust accuracy before and after.

Every option of `examples/finetune.py` works here too (this script reuses its arguments and helpers); `--tiny`
runs offline on a tiny random CLIP (built once and cached):

    python examples/finetune_4bit.py --tiny --max-steps 20
    python examples/finetune_4bit.py --model flaviagiammarino/pubmed-clip-vit-base-patch32

It leaves in `--output-dir`: the adapter (loads in stock PEFT on the full-precision base too), its model card and
`ran_metrics.json` (with a `memory` entry), and `ran_metrics.png`.
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of non-4-bit runs)

# isort: split

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser

from ran_peft.pretrain import build_tiny_clip
from ran_peft.scripts import (
    FinetuneArguments,
    UsageError,
    check_arguments,
    classification_setup,
    load_data,
    report_errors,
    train_measure_and_save,
)

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FourBitArguments:
    """The options of this script beyond `examples/finetune.py`'s (`--help` prints both)."""

    tiny: bool = field(
        default=False,
        metadata={
            "help": "Use a tiny random CLIP built offline (for smoke runs; its accuracy means nothing)."
        },
    )
    compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the 4-bit layers compute in: float32, bfloat16, float16, or auto (bfloat16 on a GPU, "
            "float32 on the CPU)."
        },
    )
    double_quant: bool = field(
        default=False,
        metadata={"help": "Also quantise the quantisation constants (QLoRA's double quantisation)."},
    )


def fp32_footprint(source: str) -> int:
    """Bytes the model would take in fp32, measured on an empty (meta-device) copy: nothing is loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    with init_empty_weights():
        reference = AutoModel.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    return reference.get_memory_footprint()


def load_four_bit(source: str, four_bit: FourBitArguments):
    """The base model in 4-bit nf4, prepared for k-bit training, and its processor."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModel, AutoProcessor, BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    if four_bit.compute_dtype == "auto":
        compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    else:
        compute_dtype = COMPUTE_DTYPES[four_bit.compute_dtype]
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=four_bit.double_quant,
    )
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModel.from_pretrained(
            source, quantization_config=quantization, device_map={"": 0} if on_gpu else "cpu"
        )
    except (OSError, ValueError) as error:
        raise UsageError(f"--model={source!r} could not be loaded: {str(error).splitlines()[0]}") from error
    if not hasattr(model, "get_text_features"):
        raise UsageError(
            f"--model={source!r} is a {type(model).__name__}; this script fine-tunes dual encoders (CLIP, SigLIP). "
            "See examples/finetune_llava.py --load-in-4bit for generative VLMs."
        )
    footprint = model.get_memory_footprint()  # before k-bit preparation upcasts the non-quantised weights
    # Casts layer norms and other non-quantised weights to fp32 for stable training, and enables input gradients.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, processor, footprint


def run(four_bit: FourBitArguments, args: FinetuneArguments) -> dict:
    from ran_peft.experiments import evaluate_adapter
    from ran_peft.pretrain import build_default_model

    args.load_in_4bit = True
    if four_bit.tiny and args.model is not None:
        raise UsageError("pass at most one of --model and --tiny.")
    if four_bit.compute_dtype != "auto" and four_bit.compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(
            f"--compute-dtype={four_bit.compute_dtype!r} must be auto or one of {', '.join(COMPUTE_DTYPES)}."
        )
    config, epsilons = check_arguments(args)
    if four_bit.tiny:
        source = str(build_tiny_clip())
    else:
        source = args.model or str(build_default_model(progress=args.progress))
    model, processor, footprint = load_four_bit(source, four_bit)
    memory = {"four_bit_bytes": footprint, "fp32_bytes": fp32_footprint(source)}
    print(
        f"memory footprint: {memory['four_bit_bytes'] / 2**20:.2f} MiB in 4-bit nf4 vs "
        f"{memory['fp32_bytes'] / 2**20:.2f} MiB in fp32 ({memory['fp32_bytes'] / memory['four_bit_bytes']:.1f}x)"
    )

    train, evaluation = load_data(args)
    class_text_inputs, collator, pixel_box, settings = classification_setup(
        args, processor, train, config, source, epsilons
    )
    measure: dict[str, Any] = dict(class_text_inputs=class_text_inputs)
    metrics: dict[str, Any] = {
        "runs": {"before": evaluate_adapter(model, evaluation, collator, pixel_box, settings, **measure)},
        "recipe": config.recipe_dict(),
        "base_model": "tiny-random-clip" if four_bit.tiny else (args.model or "embedded"),
        "quantization": f"4-bit nf4 (bitsandbytes), compute dtype {four_bit.compute_dtype}",
        "memory": memory,
    }
    return train_measure_and_save(
        args,
        model,
        lambda: load_four_bit(source, four_bit)[0],
        config,
        train,
        evaluation,
        collator,
        processor,
        pixel_box,
        settings,
        metrics,
        class_text_inputs=class_text_inputs,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser((FourBitArguments, FinetuneArguments))
    four_bit, args = parser.parse_args_into_dataclasses(args=argv)
    return report_errors(lambda: run(four_bit, args))


if __name__ == "__main__":
    sys.exit(main())
