"""A generic shrinker for transformers configs: every width, depth, head count and vocabulary of a family's default
config (and its sub-configs) made tiny, the rest (layouts, patch sizes, merge factors) kept as the family has them.

It works on the config's dict and rebuilds the config class from it, so the values a config derives in
`__post_init__` (head dims, layer types) are derived again from the tiny ones. Per-family facts that no generic rule
can know (a processor's minimum patch budget, a list that must keep its length) live in `registry_overrides.py`.
"""

from __future__ import annotations

from typing import Any

WIDTH = 32
FFN = 64
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 16  # WIDTH // HEADS: towers that derive their head dim get the same one
LAYERS = 1
VOCAB = 256
# Special token ids are moved into [SPECIAL_START, VOCAB): text tokens are drawn below it.
SPECIAL_START = 160
EXPERTS = 4
EXPERTS_PER_TOKEN = 2

# Names of widths that every tower and projector must agree on: all become WIDTH, so they still agree.
_WIDTH_NAMES = {
    "hidden_size", "d_model", "n_embd", "embed_dim", "width", "hidden_dim", "dim", "text_hidden_size",
    "vision_hidden_size", "out_hidden_size", "projection_dim", "projector_hidden_size", "encoder_hidden_size",
    "mm_hidden_size", "projection_size", "project_dim", "image_text_hidden_size", "output_dim", "embedding_dim",
    "decoder_hidden_size", "vision_embed_dim", "text_embed_dim", "projection_hidden_size", "word_embed_proj_dim",
    "image_token_embed_dim", "projector_input_dim", "projector_output_dim", "merged_hidden_size",
    "pooler_output_size", "d_latents", "d_inner", "adapter_in_dim", "adapter_out_dim",
    "vision_output_dim", "share_expert_dim", "hidden_size_per_layer_input", "latent_channels", "ple_embed_dim",
    "class_expand", "codebook_dim", "query_hidden_size", "qformer_hidden_size", "text_encoder_hidden_size",
    "vision_feature_dim", "image_hidden_size", "feature_dim", "vit_hidden_size", "llm_hidden_size",
}  # fmt: skip
_FFN_NAMES = {
    "intermediate_size", "ffn_dim", "d_ff", "mlp_dim", "encoder_ffn_dim", "decoder_ffn_dim", "decoder_intermediate_size",
    "intermediate_size_mlp", "dense_intermediate_size", "projection_intermediate_size", "alignment_intermediate_size",
    "moe_hidden_size", "projector_intermediate_size", "vision_intermediate_size", "text_intermediate_size",
}  # fmt: skip
_SMALL_FFN_NAMES = {
    "moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
    "moe_shared_expert_intermediate_size", "shared_intermediate_size",
}  # fmt: skip
_LAYER_NAMES = {
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "encoder_layers", "decoder_layers",
    "num_decoder_layers", "num_encoder_layers", "decoder_num_layers", "layers", "num_global_layers",
    "resampler_depth", "num_spatial_layers", "num_temporal_layers", "projector_depth", "aligner_num_add_layers",
}  # fmt: skip
# The depth that per-layer lists follow, most specific first.
_DEPTH_ORDER = (
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "depth",
    "encoder_layers",
    "decoder_layers",
)
# Tuples, not sets: the first name a config has is its head count, and a set's order changes with the process's
# string hashing (PYTHONHASHSEED), which made the sweep's outcome for configs with several head counts vary.
_HEAD_NAMES = (
    "num_attention_heads", "num_heads", "n_head", "attention_heads", "encoder_attention_heads",
    "decoder_attention_heads", "resampler_n_heads", "resampler_heads", "num_cross_attention_heads",
    "num_self_attention_heads", "swa_num_attention_heads", "index_n_heads", "linear_num_heads",
)  # fmt: skip
_KV_HEAD_NAMES = {
    "num_key_value_heads",
    "swa_num_key_value_heads",
    "linear_num_key_heads",
    "multi_query_group_num",
}
_HEAD_DIM_NAMES = {
    "head_dim", "qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "swa_head_dim",
    "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim", "index_head_dim", "resampler_dim_head",
    "resampler_head_dim", "mamba_head_dim", "d_kv", "kv_channels", "attention_head_dim",
}  # fmt: skip
_EXPERT_NAMES = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_EXPERTS_PER_TOKEN_NAMES = {
    "num_experts_per_tok",
    "moe_k",
    "top_k_experts",
    "moe_topk",
    "num_experts_per_token",
}
_SMALL_COUNTS = {  # counts of learned queries, latents and low ranks: a handful is enough
    "num_query_tokens": 4, "num_latents": 4, "resampler_n_latents": 4, "resampler_num_latents": 4,
    "latent_query_num": 4, "kv_lora_rank": 16, "q_lora_rank": 16, "n_group": 1, "topk_group": 1,
    "linear_num_value_heads": 4, "mamba_num_heads": 4, "ssm_state_size": 8, "n_groups": 1, "laurel_rank": 8,
    "hc_lowrank": 8, "loop_gate_rank": 8, "index_topk": 4, "num_registers": 2, "num_shared_experts": 1,
    "n_shared_experts": 1, "index_kpool": 2, "index_topk_blocks": 2, "index_block_size": 4, "base_channels": 32,
    "num_res_blocks": 1, "aspp_out_channels": 16,
}  # fmt: skip
_POSITION_NAMES = {
    "max_position_embeddings",
    "n_positions",
    "max_2d_position_embeddings",
    "max_source_positions",
}
MAX_POSITIONS = 512


def _is_config_dict(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _token_id_name(name: str) -> bool:
    return name.endswith(("_token_id", "_token_index", "_token_ids")) or name in {
        "im_start_id", "im_end_id", "im_newline_id", "image_patch_id", "user_token_id",
    }  # fmt: skip


class _TokenIds:
    """Moves every special token id into [SPECIAL_START, VOCAB), consistently: one id always maps to the same small
    id, wherever it appears, and text tokens drawn below SPECIAL_START never collide with one."""

    def __init__(self) -> None:
        self.mapped: dict[int, int] = {}

    def __call__(self, value: int) -> int:
        if value not in self.mapped:
            if SPECIAL_START + len(self.mapped) >= VOCAB:
                raise ValueError("more special tokens than the tiny vocabulary holds")
            self.mapped[value] = SPECIAL_START + len(self.mapped)
        return self.mapped[value]


def _kept_layers(config: dict, old_layers: int | None) -> list[int]:
    """Which of the old layers the tiny config keeps: the first of each kind (`layer_types`), else the first."""
    kinds = config.get("layer_types")
    if isinstance(kinds, list) and kinds and (old_layers is None or len(kinds) == old_layers):
        first = {}
        for index, kind in enumerate(kinds):
            first.setdefault(str(kind), index)
        return sorted(first.values())
    return list(range(LAYERS))


def _shrink_list(name: str, value: list, old_layers: int | None, kept: list[int]) -> list:
    """Per-layer lists keep the kept layers; lists of layer indices keep the indices that still exist."""
    new_layers = len(kept)
    per_layer = not any(isinstance(item, (list, tuple, dict)) for item in value)
    if per_layer and old_layers and len(value) == old_layers and old_layers != new_layers:
        return [value[index] for index in kept]
    layer_indices = name.endswith(("layers", "indexes", "indices", "idxs", "_ids")) or "layer" in name
    if layer_indices and _int_list(value):
        kept = [item for item in value if -new_layers - 1 <= item < new_layers]
        return kept or [min(max(value[0], -new_layers), new_layers - 1)]
    return value


# Staged (hierarchical) towers: one value per stage. The stage count stays; each stage gets one block and a small
# width, with one attention head (a width is always divisible by 1).
_STAGE_WIDTH_NAMES = {
    "hidden_sizes", "embed_dims", "embed_dim", "neck_hidden_sizes", "stage_out_channels", "stage_in_channels",
    "stage_mid_channels", "dims", "channels", "hidden_dims", "widths", "base_attn_unit_dims",
}  # fmt: skip
# Multipliers of every width (or depth) of convolutional towers: a quarter of the width, one block per stage.
_MULTIPLIERS = {
    "width_coefficient": 0.25,
    "depth_coefficient": 1.0,
    "depth_multiplier": 0.25,
    "width_multiplier": 0.25,
}
_STAGE_DEPTH_NAMES = (
    "depths",
    "depth",
    "num_block_repeats",
    "stage_num_blocks",
    "stage_numb_of_layers",
    "num_blocks",
)
_STAGE_HEAD_NAMES = {"num_heads", "num_attention_heads", "attention_heads", "heads"}
STAGE_WIDTH = 16
STAGED_IMAGE_SIZE = 64  # four stages that halve the resolution each still see a 4 x 4 map at the end
# Derived from the stage count or the depth: the config derives them again.
_DERIVED = ("out_features", "out_indices", "stage_names")


def _int_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    )


def is_staged(config: dict) -> bool:
    """A hierarchical tower: per-stage lists of depths or widths."""
    return any(_int_list(config.get(name)) for name in (*_STAGE_DEPTH_NAMES, "hidden_sizes", "embed_dims"))


def _shrink_stages(config: dict) -> None:
    depths = next((config[name] for name in _STAGE_DEPTH_NAMES if _int_list(config.get(name))), None)
    stages = len(depths) if depths else None
    for name, value in list(config.items()):
        if not _int_list(value):
            continue
        if name in _STAGE_DEPTH_NAMES:
            config[name] = [1] * len(value)
        elif name in _STAGE_WIDTH_NAMES:
            config[name] = [min(item, STAGE_WIDTH * (index + 1)) for index, item in enumerate(value)]
        elif name in _STAGE_HEAD_NAMES and (stages is None or len(value) == stages):
            config[name] = [1] * len(value)
    # Per-block channel lists chain: a block takes what the one before it gave.
    if _int_list(config.get("in_channels")) and _int_list(config.get("out_channels")):
        out = [STAGE_WIDTH * (index + 1) for index in range(len(config["out_channels"]))]
        config["out_channels"] = out
        config["in_channels"] = [STAGE_WIDTH] + out[:-1]
    if isinstance(config.get("window_size"), int):
        config["window_size"] = min(config["window_size"], 2)
    if isinstance(config.get("num_groups"), int):  # group norms over the small stage widths
        config["num_groups"] = min(config["num_groups"], 4)


def _shrunk_int(name: str, value: int, kept: list[int], kv_equal: bool) -> int | None:
    """The tiny value of an int setting, or None to keep it. A value is never made larger."""
    if name in _WIDTH_NAMES:
        target = WIDTH
    elif name in _FFN_NAMES:
        target = FFN
    elif name in _SMALL_FFN_NAMES:
        target = WIDTH
    elif name in _LAYER_NAMES:
        target = len(kept)
    elif name in _HEAD_NAMES:
        target = HEADS
    elif name in _KV_HEAD_NAMES:
        target = HEADS if (name == "num_key_value_heads" and kv_equal) else KV_HEADS
    elif name in _HEAD_DIM_NAMES:
        target = HEAD_DIM
    elif name in _EXPERT_NAMES:
        target = EXPERTS
    elif name in _EXPERTS_PER_TOKEN_NAMES:
        target = EXPERTS_PER_TOKEN
    elif name in _SMALL_COUNTS:
        target = _SMALL_COUNTS[name]
    elif name in {"vocab_size", "vocab_size_per_layer_input", "text_vocab_size"}:
        target = VOCAB
    elif name in _POSITION_NAMES:
        target = MAX_POSITIONS
    elif name == "mm_tokens_per_image":
        target = 4  # a 2 x 2 pooled grid: divides the tiny tower's 4 x 4 patches
    elif name == "max_window_layers":
        target = len(kept)
    else:
        return None
    return min(value, target)


def shrink_config_dict(
    config: dict, *, image_size: int | None, token_ids: _TokenIds | None = None, mrope: bool = False
) -> dict:
    """The tiny version of one config dict (recursing into sub-config dicts). `mrope`: the config's rotary
    embedding splits its frequencies over (time, height, width) sections, which must fit the tiny head dim."""
    token_ids = token_ids or _TokenIds()
    config = dict(config)
    staged = is_staged(config)
    for name in _DERIVED:
        config.pop(name, None)
    if staged:
        config.pop("layer_types", None)
        _shrink_stages(config)
    old_layers = next((config[name] for name in _DEPTH_ORDER if isinstance(config.get(name), int)), None)
    kept = _kept_layers(config, old_layers)
    heads_old = next((config[name] for name in _HEAD_NAMES if isinstance(config.get(name), int)), None)
    kv_equal = config.get("num_key_value_heads") == heads_old
    for name, value in list(config.items()):
        if _is_config_dict(value):
            config[name] = shrink_config_dict(value, image_size=image_size, token_ids=token_ids, mrope=mrope)
        elif value is None and name in {"image_token_id", "image_token_index"}:
            config[name] = token_ids(-1)  # a model that can take image placeholders gets one
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, float) and name in _MULTIPLIERS:
            config[name] = min(value, _MULTIPLIERS[name])
        elif isinstance(value, int) and name == "image_size" and image_size is not None:
            config[name] = image_size
        elif isinstance(value, int) and (_token_id_name(name) or name in _PLAIN_TOKEN_NAMES):
            config[name] = token_ids(value)
        elif isinstance(value, int) and not (staged and name in _LAYER_NAMES):
            shrunk = _shrunk_int(name, value, kept, kv_equal)
            if shrunk is not None:
                config[name] = shrunk
        elif isinstance(value, list) and name == "image_size" and image_size is not None:
            config[name] = [max(1, round(item * image_size / max(value))) for item in value]
        elif isinstance(value, list) and (name in _PLAIN_TOKEN_NAMES or _token_id_name(name)):
            config[name] = [token_ids(item) if isinstance(item, int) else item for item in value]
        elif isinstance(value, list) and not staged:
            config[name] = _shrink_list(name, value, old_layers, kept)
        elif isinstance(value, dict) and name == "per_layer_config":
            config[name] = {
                str(kept.index(int(key))).zfill(len(key)) if key.isdigit() else key: item
                for key, item in value.items()
                if not key.isdigit() or int(key) in kept
            }
    if isinstance(config.get("rope_parameters"), dict):
        head_dim = config.get("head_dim") if isinstance(config.get("head_dim"), int) else None
        width = config.get("hidden_size") if isinstance(config.get("hidden_size"), int) else None
        heads = next((config[name] for name in _HEAD_NAMES if isinstance(config.get(name), int)), None)
        if head_dim is None and width and heads:
            head_dim = width // heads
        parameters = config["rope_parameters"]
        rotary = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0
        if (
            head_dim
            and (mrope or "mrope_section" in parameters)
            and "vision" not in str(config.get("model_type"))
        ):
            half = int(head_dim * rotary) // 2
            if parameters and all(isinstance(value, dict) for value in parameters.values()):  # per layer type
                config["rope_parameters"] = {
                    kind: {**value, "mrope_section": _sections(half)} for kind, value in parameters.items()
                }
            elif "rope_type" in parameters or "rope_theta" in parameters:
                config["rope_parameters"] = {**parameters, "mrope_section": _sections(half)}
    return config


def with_equal_kv_heads(config: dict) -> dict:
    """The config with as many key/value heads as query heads (for architectures whose validator requires it)."""
    config = dict(config)
    heads = next((config[name] for name in _HEAD_NAMES if isinstance(config.get(name), int)), HEADS)
    for name, value in config.items():
        if _is_config_dict(value):
            config[name] = with_equal_kv_heads(value)
        elif name in _KV_HEAD_NAMES and isinstance(value, int):
            config[name] = heads
    return config


_PLAIN_TOKEN_NAMES = {
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
}


def _sections(half: int) -> list[int]:
    """Temporal, height and width rotary sections over `half` frequencies, in Qwen2-VL's 2:3:3 proportion."""
    temporal = max(1, half // 4)
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]
