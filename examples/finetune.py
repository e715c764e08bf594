"""Fine-tune a vision-language model (or an image classifier) with RAN through the stock `transformers.Trainer`.

With no arguments it runs offline: a small CLIP-style model pre-trained on the built-in synthetic upstream data
(built on first use and cached) is fine-tuned with RAN on the built-in synthetic downstream task, and clean and
robust accuracy are measured before and after. With the network, `--model` and `--dataset` take Hub ids:

    python examples/finetune.py
    python examples/finetune.py --model flaviagiammarino/pubmed-clip-vit-base-patch32 --dataset owner/dataset
    python examples/finetune.py --model hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224  # open_clip
    torchrun --nproc_per_node 2 examples/finetune.py --max-steps 4 --output-dir runs/ddp

It leaves in `--output-dir`: the adapter (loads in stock PEFT), its model card (README.md), `ran_metrics.json` and
`ran_metrics.png`.
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of non-4-bit runs)

# isort: split

import logging
import os
import sys
import tempfile

import torch
from transformers import HfArgumentParser, TrainingArguments

from ran_peft.open_clip import is_open_clip_name
from ran_peft.scripts import (
    FinetuneArguments,
    UsageError,
    check_arguments,
    classification_setup,
    load_data,
    report_errors,
    train_measure_and_save,
)

logger = logging.getLogger("ran_peft.finetune")


def load_model_and_processor(args: FinetuneArguments, training_args: TrainingArguments):
    """The base model (optionally 4-bit) and its processor. The embedded default is built once, on rank 0 first."""
    from transformers import AutoModel, AutoProcessor, BitsAndBytesConfig

    from ran_peft.open_clip import load_open_clip
    from ran_peft.pretrain import build_default_model

    source = args.model
    if is_open_clip_name(
        source
    ):  # BiomedCLIP and other open_clip models: open_clip's own loader and tokenizer
        if args.load_in_4bit:
            raise UsageError(
                f"--model={source!r}: --load-in-4bit is for transformers models, not open_clip ones."
            )
        try:
            model, processor = load_open_clip(source)
        except (OSError, RuntimeError, ValueError) as error:
            raise UsageError(
                f"--model={source!r} could not be loaded: {str(error).splitlines()[0]}"
            ) from error
        return model, processor, source
    if source is None:
        with training_args.main_process_first(desc="building the embedded default model"):
            source = str(build_default_model(progress=args.progress))
    kwargs = {}
    if args.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModel.from_pretrained(source, **kwargs)
    except OSError as error:
        raise UsageError(f"--model={source!r} could not be loaded: {str(error).splitlines()[0]}") from error
    if not hasattr(model, "get_text_features"):
        raise UsageError(
            f"--model={source!r} is a {type(model).__name__}; this script fine-tunes dual encoders (CLIP, SigLIP) "
            "as prompt-based classifiers. See examples/finetune_llava.py for generative VLMs."
        )
    if args.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, processor, source


def run(args: FinetuneArguments) -> dict:
    from ran_peft.experiments import evaluate_adapter

    config, epsilons = check_arguments(args)
    probe_args = TrainingArguments(
        output_dir=tempfile.gettempdir(), report_to=[], use_cpu=not torch.cuda.is_available()
    )
    model, processor, source = load_model_and_processor(args, probe_args)
    train, evaluation = load_data(args)
    class_text_inputs, collator, pixel_box, settings = classification_setup(
        args, processor, train, config, source, epsilons
    )
    measure = dict(class_text_inputs=class_text_inputs)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    metrics = {
        "attack": {},
        "runs": {},
        "recipe": config.recipe_dict(),
        "base_model": args.model or "embedded",
    }
    if args.dataset == "synthetic":  # the card names the synthetic task it was evaluated on
        metrics["synthetic_task"] = args.task
    if not distributed:  # under torchrun, rank 0 measures once training is done
        metrics["runs"]["before"] = evaluate_adapter(
            model, evaluation, collator, pixel_box, settings, **measure
        )

    return train_measure_and_save(
        args,
        model,
        lambda: load_model_and_processor(args, probe_args)[0],
        config,
        train,
        evaluation,
        collator,
        processor,
        pixel_box,
        settings,
        metrics,
        class_text_inputs=class_text_inputs,
        distributed=distributed,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser(FinetuneArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
