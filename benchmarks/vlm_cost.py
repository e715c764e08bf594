"""Peak memory and step time of RAN against plain LoRA on a LLaVA-style generative VLM (random weights, built from a
config): LoRA on the language model and the projector, vocabulary 32k, a few hundred image tokens per sequence.

    python benchmarks/vlm_cost.py --out benchmarks/results/vlm_cost-cpu.json [--quick] [--case realistic]

`--case realistic` gives the vision tower LLaVA-1.5-7B's share of the FLOPs (a few percent; both shares are
counted and written). Each case (LoRA, RAN defaults, RAN with 2 attack steps, the vision-only recipes `ran_vision` and
`ran_vision_task`, RAN on every 3rd step, Free AT with 2 and 3 replays; `--recipes` picks some) runs in a fresh
process; the peak is that of the training steps alone (VmHWM reset after the model is built on CPU;
`torch.cuda.max_memory_allocated` reset after building on CUDA), above what the process held just before the first
step. Ratios are of mean step times: give a recipe that alternates kinds of steps a multiple of its period
(`--steps`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
EPSILON = 4 / 255
# LoRA on the language model's attention and the projector; the vision tower stays frozen and adapter-free.
TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)|.*multi_modal_projector\.linear_[12]"

RECIPES = {
    "lora": dict(epsilon=0.0, kl_weight=0.0),
    "ran": dict(),  # RANConfig's defaults
    "ran_k2": dict(attack_steps=2),
    # The light-weight recipe for generative VLMs: the attack and the consistency term through the vision tower and
    # projector alone (`adversarial_pass='image_features'`); the language model sees the clean pass only.
    "ran_vision": dict(
        adversarial_pass="image_features",
        attack_loss="consistency",
        consistency_weight=1.0,
        kl_weight=0.0,
        adversarial_weight=0.0,
        free_start=False,
    ),
    "ran_every3": dict(attack_every=3),  # RAN's default recipe on every 3rd step only
    # The same vision-only pass, its one attack step the clean task loss's input gradient (free start).
    "ran_vision_task": dict(
        adversarial_pass="image_features",
        attack_loss="task",
        consistency_weight=1.0,
        kl_weight=0.0,
        adversarial_weight=0.0,
    ),
    # Free AT: each batch replayed twice (clean, then adversarial), one forward/backward per step; `--steps` even.
    "ran_free2": dict(free_replay=2),
    "ran_free3": dict(free_replay=3),  # the same with 3 replays; `--steps` a multiple of 3
}
# Issue 21's light-weight recipes: their goals (step at most 1.3x LoRA's, peak memory at most 1.15x) and headline keys.
LIGHT_WEIGHT = ("ran_vision", "ran_vision_task", "ran_free2", "ran_free3")


@dataclass
class VLMShape:
    """The benchmark model and batch. Defaults: ~100M parameters, 512-token sequences, 256 of them image tokens."""

    vocab: int = 32000
    hidden: int = 768
    layers: int = 6
    heads: int = 12
    intermediate: int = 2048
    vision_hidden: int = 384
    vision_layers: int = 6
    image_size: int = 224
    patch: int = 14
    sequence: int = 512
    answer_tokens: int = 128
    batch: int = 2

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def image_token_id(self) -> int:
        """The vocabulary's last id stands for "an image patch goes here"."""
        return self.vocab - 1


# LLaVA-1.5-7B's proportions, scaled to a CPU: the vision tower and projector take a few percent of a forward pass's
# FLOPs (LLaVA-1.5-7B: CLIP ViT-L/14-336 beside a 7B Llama, measured by `vision_flop_share(LLAVA_15_7B)`), because
# the language model is much wider and deeper than the vision tower, as here.
REALISTIC = VLMShape(
    hidden=1024,
    layers=8,
    heads=16,
    intermediate=2816,
    vision_hidden=384,
    vision_layers=5,
    image_size=224,
    patch=14,
    sequence=512,
    answer_tokens=128,
)
# LLaVA-1.5-7B itself (only ever built on the meta device, to count its FLOPs): 576 image tokens of 24 x 24 patches.
LLAVA_15_7B = VLMShape(
    vocab=32064,
    hidden=4096,
    layers=32,
    heads=32,
    intermediate=11008,
    vision_hidden=1024,
    vision_layers=24,
    image_size=336,
    patch=14,
    sequence=676,  # 576 image tokens and a 100-token prompt and answer
    answer_tokens=32,
    batch=1,
)
CASES = {"default": None, "realistic": REALISTIC}

QUICK = VLMShape(
    hidden=128,
    layers=2,
    heads=4,
    intermediate=256,
    vision_hidden=64,
    vision_layers=2,
    image_size=112,
    sequence=192,
    answer_tokens=32,
)


def vlm_config(shape: VLMShape):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        num_hidden_layers=shape.layers,
        max_position_embeddings=max(2048, shape.sequence),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=shape.vision_hidden,
        intermediate_size=4 * shape.vision_hidden,
        num_attention_heads=max(1, shape.vision_hidden // 64),
        num_hidden_layers=shape.vision_layers,
        image_size=shape.image_size,
        patch_size=shape.patch,
        projection_dim=shape.vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text.to_dict(),
        image_token_index=shape.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # every patch token is an image token (CLS dropped)
        projector_hidden_act="gelu",
    )


def vision_flop_share(shape: VLMShape) -> dict[str, float]:
    """The share of one forward pass's FLOPs spent in the vision tower and projector (`get_image_features`), counted
    by torch's `FlopCounterMode` on the meta device (no memory, no time: only shapes)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(vlm_config(shape))
        batch = {key: value.to("meta") for key, value in make_batch(shape).items()}
        # The language model on the merged sequence (image features in place of the image tokens): on meta tensors
        # LLaVA's own forward cannot check its placeholders, which reads values.
        embeddings = torch.empty(shape.batch, shape.sequence, shape.hidden)
    model.eval()

    def language_model():
        hidden = model.model.language_model(inputs_embeds=embeddings).last_hidden_state
        return model.lm_head(hidden)

    counts = {}
    for name, run in (
        ("vision", lambda: model.get_image_features(pixel_values=batch["pixel_values"])),
        ("language", language_model),
    ):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run()
        counts[name] = counter.get_total_flops()
    total = counts["vision"] + counts["language"]
    return {
        "vision_flops": counts["vision"],
        "forward_flops": total,
        "vision_flop_share": counts["vision"] / total,
    }


def make_batch(shape: VLMShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Image tokens, then prompt text, then the answer; the loss counts the answer tokens only."""
    from ran_peft import PixelBox

    if shape.image_tokens + shape.answer_tokens + 1 > shape.sequence:
        raise ValueError(
            f"sequence={shape.sequence} cannot hold {shape.image_tokens} image tokens and {shape.answer_tokens} "
            "answer tokens: make it longer or the answer shorter."
        )
    generator = torch.Generator().manual_seed(seed)
    text_length = shape.sequence - shape.image_tokens
    text = torch.randint(3, shape.image_token_id, (shape.batch, text_length), generator=generator)
    input_ids = torch.cat([torch.full((shape.batch, shape.image_tokens), shape.image_token_id), text], dim=1)
    labels = input_ids.clone()
    labels[:, : shape.sequence - shape.answer_tokens] = -100
    raw = torch.rand(shape.batch, 3, shape.image_size, shape.image_size, generator=generator)
    return {
        "pixel_values": PixelBox(MEAN, STD).from_pixels(raw),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
    }


def build(
    recipe: str, shape: VLMShape, device: str, seed: int = 0, load_from: str | None = None, four_bit=False
):
    """The model with the recipe's adapter: from the config (random weights), or loaded from a saved folder, in
    4-bit NF4 through bitsandbytes with `four_bit` (float32 compute, so that only the weight storage differs)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    from ran_peft import RANConfig

    torch.manual_seed(seed)
    if four_bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = LlavaForConditionalGeneration.from_pretrained(
            load_from, quantization_config=quantization, device_map={"": device}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif load_from is not None:
        model = LlavaForConditionalGeneration.from_pretrained(load_from).to(device)
    else:
        model = LlavaForConditionalGeneration(vlm_config(shape)).to(device)
    config = RANConfig(r=8, target_modules=TARGET_MODULES, **{"epsilon": EPSILON, **RECIPES[recipe]})
    return get_peft_model(model, config), config


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory of what runs between `start()` and `peak_mib()`, above what was held at `start()`."""

    def __init__(self, device: str):
        self.device = device
        self.before = 0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return
        with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
            handle.write("5")
        self.before = _status_kib("VmRSS:") * 1024

    def peak_mib(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.before) / 2**20
        return (_status_kib("VmHWM:") * 1024 - self.before) / 2**20

    @property
    def method(self) -> str:
        if self.device.startswith("cuda"):
            return "torch.cuda.max_memory_allocated during the steps minus memory_allocated before them"
        return "VmHWM during the steps (reset through /proc/self/clear_refs) minus VmRSS before them"


def peak_allocated_mib_on_cpu(step) -> float | None:
    """The peak of the tensor memory `step` allocates, from torch's profiler memory timeline (one extra, untimed step):
    the CPU counterpart of `torch.cuda.max_memory_allocated`, blind to how malloc caches freed memory. None when the
    profiler's (private) timeline API is not there."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError:
        return None
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    try:
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    except (AttributeError, TypeError):
        return None
    if not sizes:
        return 0.0
    # The first point holds what existed before the step (weights, batch): the peak is counted above it.
    return (max(sum(size) for size in sizes) - sum(sizes[0])) / 2**20


def run_case(
    recipe: str, shape: VLMShape, steps: int, warmup: int, device: str, load_from=None, four_bit=False
) -> dict:
    """Build the model, then time `warmup + steps` RAN steps and measure their peak memory (this process)."""
    from ran_peft import PixelBox, detect_family, ran_loss
    from ran_peft.recipe_memory import RecipeMemory

    model, config = build(recipe, shape, device, load_from=load_from, four_bit=four_bit)
    batch = {key: value.to(device) for key, value in make_batch(shape).items()}
    box = PixelBox(MEAN, STD)
    family = detect_family(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    recipe_memory = RecipeMemory()  # Free AT's replay, kept from one step to the next
    memory = PeakMemory(device)
    memory.start()
    times, cpu_times = [], []
    for index in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        ran_loss(
            model, batch, config, pixel_box=box, family=family, step=index, memory=recipe_memory
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = memory.peak_mib()
    allocated = None
    if not device.startswith("cuda"):

        def one_step():
            ran_loss(
                model, batch, config, pixel_box=box, family=family, step=warmup + steps, memory=recipe_memory
            ).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        allocated = peak_allocated_mib_on_cpu(one_step)
    return {
        "peak_mib": peak,
        "peak_allocated_mib": allocated,
        "held_before_steps_mib": memory.before / 2**20,
        "step_seconds": times[warmup:],
        "step_cpu_seconds": cpu_times[warmup:],
        "warmup_seconds": times[:warmup],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "memory_method": memory.method,
    }


def run_in_fresh_process(
    recipe: str,
    shape: VLMShape,
    steps: int,
    warmup: int,
    device: str,
    load_from=None,
    four_bit=False,
    env=None,
) -> dict:
    arguments = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        recipe,
        "--shape",
        json.dumps(asdict(shape)),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--device",
        device,
    ]
    arguments += ["--load-from", load_from] if load_from else []
    arguments += ["--four-bit"] if four_bit else []
    done = subprocess.run(
        arguments, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {recipe} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_four_bit(shape: VLMShape, steps: int, warmup: int, device: str, log=print) -> dict:
    """Peak memory of RAN steps (defaults) with the model's weights in 4-bit NF4 against float32 (fresh processes).

    Both load the same saved random weights. `..._with_weights` also counts what the loaded model holds."""
    import tempfile

    from transformers import LlavaForConditionalGeneration

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlavaForConditionalGeneration(vlm_config(shape)).save_pretrained(folder)
        runs = {
            name: run_in_fresh_process(
                "ran", shape, steps, warmup, device, load_from=folder, four_bit=four_bit
            )
            for name, four_bit in (("fp32", False), ("nf4", True))
        }
    for name, run in runs.items():
        log(
            f"{name:>5}: steps' peak {run['peak_mib']:8.1f} MiB, held before {run['held_before_steps_mib']:8.1f} MiB"
        )
    with_weights = {name: run["peak_mib"] + run["held_before_steps_mib"] for name, run in runs.items()}
    return {
        "qlora4bit_over_fp32_memory_ratio": with_weights["nf4"] / with_weights["fp32"],
        "qlora4bit_over_fp32_steps_peak_ratio": runs["nf4"]["peak_mib"] / runs["fp32"]["peak_mib"],
        "peak_with_weights_mib": with_weights,
        "runs": runs,
        "method": "RAN defaults, fresh process per case; with weights = what the process held before the steps "
        "(weights, adapter, batch) + the steps' peak above it; NF4 through bitsandbytes with float32 compute",
    }


def measure(
    shape: VLMShape,
    steps: int,
    warmup: int,
    rounds: int,
    device: str,
    log=print,
    env=None,
    recipes: tuple[str, ...] | None = None,
) -> dict:
    """Every case in its own fresh process, the cases interleaved over `rounds` rounds; JSON-ready results.

    `recipes`: the cases to run (default: all of `RECIPES`); LoRA, the reference of every ratio, always runs.
    Step time: the median over all timed steps of all rounds. Peak memory: the largest of the rounds.
    """
    names = [name for name in RECIPES if name == "lora" or recipes is None or name in recipes]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names:
            result = run_in_fresh_process(name, shape, steps, warmup, device, env=env)
            runs[name].append(result)
            log(
                f"round {round_index + 1}/{rounds} {name:>7}: peak {result['peak_mib']:8.1f} MiB, median step "
                f"{statistics.median(result['step_seconds']):7.2f} s",
                flush=True,
            )
    peak = {name: max(run["peak_mib"] for run in results) for name, results in runs.items()}
    median = {
        name: statistics.median(t for run in results for t in run["step_seconds"])
        for name, results in runs.items()
    }
    cpu = {
        name: statistics.median(t for run in results for t in run["step_cpu_seconds"])
        for name, results in runs.items()
    }
    allocated = {
        name: max(run["peak_allocated_mib"] or 0 for run in results) for name, results in runs.items()
    }
    first = runs["lora"][0]
    # Means for the ratios: a recipe that attacks on every k-th step only has steps of two kinds, and its cost is
    # their mean (with `--steps` a multiple of k); the medians are kept beside them.
    mean = {
        name: statistics.mean(t for run in results for t in run["step_seconds"])
        for name, results in runs.items()
    }
    cpu_mean = {
        name: statistics.mean(t for run in results for t in run["step_cpu_seconds"])
        for name, results in runs.items()
    }
    per_recipe = {
        name: {
            "step_over_lora": mean[name] / mean["lora"],
            "step_cpu_time_over_lora": cpu_mean[name] / cpu_mean["lora"],
            "median_step_over_lora": median[name] / median["lora"],
            "peak_memory_over_lora": peak[name] / peak["lora"],
            "peak_allocated_over_lora": allocated[name] / allocated["lora"]
            if all(allocated.values())
            else None,
        }
        for name in names
    }
    headline = {}
    for name in ("ran", "ran_k2"):  # medians: the attacked step's own cost
        if name in names:
            headline[f"vlm_{name}_over_lora_peak_memory_ratio"] = peak[name] / peak["lora"]
            headline[f"vlm_{name}_over_lora_step_ratio"] = median[name] / median["lora"]
            headline[f"vlm_{name}_over_lora_step_cpu_time_ratio"] = cpu[name] / cpu["lora"]
            headline[f"vlm_{name}_over_lora_peak_allocated_ratio"] = (
                allocated[name] / allocated["lora"] if all(allocated.values()) else None
            )
    for name in LIGHT_WEIGHT:  # means: a light-weight recipe's steps can be of several kinds
        if name in names:
            headline[f"vlm_{name}_over_lora_step_ratio"] = per_recipe[name]["step_over_lora"]
            headline[f"vlm_{name}_over_lora_peak_memory_ratio"] = per_recipe[name]["peak_memory_over_lora"]
    return {
        "ratios_to_lora": per_recipe,
        **headline,
        "peak_allocated_mib": allocated if all(allocated.values()) else None,
        "peak_mib": peak,
        "step_seconds_median": median,
        "step_seconds_mean": mean,
        "step_cpu_seconds_mean": cpu_mean,
        "step_cpu_seconds_median": cpu,
        "runs": runs,
        "model": {
            **asdict(shape),
            "image_tokens": shape.image_tokens,
            "parameters": first["parameters"],
            "trainable_parameters": first["trainable_parameters"],
            "lora_rank": 8,
            "target_modules": TARGET_MODULES,
            "dtype": "float32",
        },
        "protocol": {
            "device": device,
            "rounds": rounds,
            "warmup_steps": warmup,
            "timed_steps_per_round": steps,
            "memory_method": first["memory_method"],
            "allocated_method": "CPU only: one extra untimed step under torch.profiler(profile_memory=True); the peak of "
            "its memory timeline above its first point (tensors allocated during the step, as "
            "torch.cuda.max_memory_allocated counts them), which malloc's caching of freed blocks does not inflate",
            "note": "each case in a fresh process (model built, then the steps alone measured); cases interleaved "
            "round by round; step = ran_loss + backward + AdamW step on one fixed batch. Step time is wall time; "
            "the CPU-time ratio (process_time, all threads) is given beside it because on a shared machine the "
            "wall time of one case depends on what else runs then",
        },
        "recipes": {name: {**_recipe_dict(), **RECIPES[name]} for name in names},
        "goals": {
            name: {"peak_memory_ratio_at_most": 1.15, "step_ratio_at_most": 2.1 if name == "ran" else 1.3}
            for name in ("ran", *LIGHT_WEIGHT)
            if name in names
        },
    }


def _recipe_dict() -> dict:
    from ran_peft import RANConfig

    return RANConfig(epsilon=EPSILON).recipe_dict()


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="a small model and few steps (a smoke run)")
    parser.add_argument(
        "--case",
        choices=sorted(CASES),
        default="default",
        help="default: ~100M parameters; realistic: LLaVA-1.5-7B's proportions (the vision tower a few percent "
        "of the FLOPs), ~150M parameters",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per case and round")
    parser.add_argument("--rounds", type=int, default=1, help="how many times every case runs, interleaved")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="CPU: set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the cases' processes, so that freed tensors above "
        "it go back to the system at once and the RSS peak follows live tensors rather than malloc's caching",
    )
    parser.add_argument(
        "--recipes",
        help=f"comma-separated cases to run (default: all of {','.join(RECIPES)}); lora always runs",
    )
    parser.add_argument("--child", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--load-from", help=argparse.SUPPRESS)
    parser.add_argument("--four-bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape = VLMShape(**json.loads(args.shape))
        print(
            json.dumps(
                run_case(
                    args.child, shape, args.steps, args.warmup, args.device, args.load_from, args.four_bit
                )
            )
        )
        return
    if not args.out:
        parser.error("--out is required")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but torch sees no CUDA device")
    shape = QUICK if args.quick else (CASES[args.case] or VLMShape())
    recipes = None
    if args.recipes:
        recipes = tuple(name.strip() for name in args.recipes.split(",") if name.strip())
        unknown = sorted(set(recipes) - set(RECIPES))
        if unknown or not recipes:
            parser.error(f"--recipes={args.recipes!r}: each must be one of {','.join(RECIPES)}")
    started = time.perf_counter()
    env = {}
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    results = {
        "machine": machine(),
        "case": "quick" if args.quick else args.case,
        "flops": {
            "this_model": vision_flop_share(shape),
            "llava_1_5_7b": vision_flop_share(LLAVA_15_7B),
            "method": "torch.utils.flop_counter.FlopCounterMode over one forward on the meta device: "
            "get_image_features (vision tower + projector) against the whole model",
        },
        **measure(shape, args.steps, args.warmup, args.rounds, args.device, env=env, recipes=recipes),
    }
    results["protocol"]["child_environment"] = env
    results["wall_seconds"] = time.perf_counter() - started
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in results.items() if k.endswith("ratio")}, indent=2))


if __name__ == "__main__":
    main()
