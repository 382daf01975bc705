"""Hugging Face checkpoints of Llama 3, Qwen3 (and Qwen2) and Gemma 3, read and written.

`config_from_hf_decoder` turns a `config.json` into a DecoderConfig (both the older
`rope_theta` / `rope_scaling` keys and transformers 5's `rope_parameters`);
`HF_NAMES` is the one name map between Hugging Face's tensor names and ours (no
transposes: both store nn.Linear weights as [out, in]); `save_hf_decoder` writes a
directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import CheckpointError
from gptforge.families import DecoderConfig
from gptforge.fileio import atomic_write_json, write_safetensors

# model_type in config.json -> gptforge arch
MODEL_TYPES = {"llama": "llama3", "qwen3": "qwen3", "qwen2": "qwen3", "gemma3_text": "gemma3"}
_ARCHITECTURES = {"llama3": ("LlamaForCausalLM", "llama"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
                  "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}

# (Hugging Face name, gptforge name); "{i}" is the block index.
_BLOCK_NAMES = [
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.norm1.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.v.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "blocks.{i}.attn.q.bias"),  # Qwen2 only
    ("model.layers.{i}.self_attn.k_proj.bias", "blocks.{i}.attn.k.bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blocks.{i}.attn.v.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.proj.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),  # Qwen3, Gemma 3
    ("model.layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.ff.gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.ff.up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.ff.down.weight"),
]
# Llama and Qwen norm before the feed-forward under the name "post_attention_layernorm";
# Gemma 3 uses that name for the norm of the attention's output and has two more.
_LLAMA_NORM2 = [("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.norm2.weight")]
_GEMMA_NORMS = [
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.post_attn_norm.weight"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.norm2.weight"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.post_ff_norm.weight"),
]
_MODEL_NAMES = [("model.embed_tokens.weight", "emb.tok.weight"), ("model.norm.weight", "final_norm.weight"),
                ("lm_head.weight", "out_head.weight")]


def hf_names(cfg: DecoderConfig) -> dict[str, str]:
    """{Hugging Face name: gptforge name} for every tensor a model of `cfg` stores."""
    table = {hf: ours for hf, ours in _MODEL_NAMES if not (cfg.tie_weights and ours == "out_head.weight")}
    block = _BLOCK_NAMES + (_GEMMA_NORMS if cfg.gemma_norms else _LLAMA_NORM2)
    for i in range(cfg.n_layers):
        for hf, ours in block:
            if (".bias" in hf and not cfg.qkv_bias) or ("_norm." in hf and not cfg.qk_norm):
                continue
            table[hf.format(i=i)] = ours.format(i=i)
    return table


def _rope_settings(config: dict[str, Any], kind: str | None) -> dict[str, Any]:
    """One layer kind's RoPE settings from either config layout ({"rope_theta", "rope_type", ...})."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and kind in params:  # Gemma 3 in transformers 5: one dict per layer kind
        return dict(params[kind])
    if isinstance(params, dict) and params:
        return dict(params)
    settings = dict(config.get("rope_scaling") or {})
    if kind == "sliding_attention" and "rope_local_base_freq" in config:
        return {"rope_theta": config["rope_local_base_freq"], "rope_type": "default"}
    if "rope_theta" in config:
        settings["rope_theta"] = config["rope_theta"]
    return settings


def _rope_scaling(settings: dict[str, Any]) -> dict | None:
    kind = settings.get("rope_type", settings.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(settings["factor"])}
    if kind == "llama3":
        return {"type": "llama3", "factor": float(settings["factor"]),
                "low_freq_factor": float(settings["low_freq_factor"]),
                "high_freq_factor": float(settings["high_freq_factor"]),
                "original_context_length": int(settings["original_max_position_embeddings"])}
    raise CheckpointError(f"RoPE scaling {kind!r} is not supported (gptforge has 'llama3' and 'linear')")


def config_from_hf_decoder(config: dict[str, Any]) -> DecoderConfig:
    """The DecoderConfig of a Llama / Qwen2 / Qwen3 / Gemma 3 `config.json`."""
    model_type = config.get("model_type")
    arch = MODEL_TYPES.get(model_type)
    if arch is None:
        raise CheckpointError(f"config.json describes a {model_type!r} model; gptforge loads gpt2, "
                              f"{', '.join(MODEL_TYPES)}")
    try:
        heads = int(config["num_attention_heads"])
        emb = int(config["hidden_size"])
        global_rope = _rope_settings(config, "full_attention")
        fields: dict[str, Any] = dict(
            vocab_size=int(config["vocab_size"]), context_length=int(config["max_position_embeddings"]),
            emb_dim=emb, n_layers=int(config["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or emb // heads), hidden_dim=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_base=float(global_rope.get("rope_theta", 10_000.0)), rope_scaling=_rope_scaling(global_rope),
            tie_weights=bool(config.get("tie_word_embeddings", False)), drop_rate=0.0,
            qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"config.json of this {model_type} model lacks or garbles {err}") from None
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    fields["activation"] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act)
    if fields["activation"] is None:
        raise CheckpointError(f"activation {act!r} is not supported (silu or gelu_pytorch_tanh)")
    if arch == "gemma3":
        local = _rope_settings(config, "sliding_attention")
        kinds = config.get("layer_types") or [
            "full_attention" if (i + 1) % int(config.get("sliding_window_pattern", 6)) == 0
            else "sliding_attention" for i in range(fields["n_layers"])]
        fields.update(gemma_norms=True, embed_scale=True, rope_local_base=float(local.get("rope_theta", 10_000.0)),
                      sliding_window=int(config.get("sliding_window") or 4096),
                      query_scale=float(config.get("query_pre_attn_scalar", fields["head_dim"])),
                      final_softcap=config.get("final_logit_softcapping"),
                      layer_types=["sliding" if k == "sliding_attention" else "full" for k in kinds])
        if config.get("attn_logit_softcapping"):
            raise CheckpointError("attention logit soft-capping (Gemma 2) is not supported")
    elif config.get("use_sliding_window") and config.get("sliding_window"):
        raise CheckpointError(f"{model_type} with use_sliding_window=true is not supported")
    return DecoderConfig(arch=arch, **fields)


def hf_decoder_config(cfg: DecoderConfig, dtype: torch.dtype, special: dict[str, Any] | None = None) -> dict:
    """A `config.json` (as a dict) for `cfg` that transformers reads (old and new rope keys)."""
    architecture, model_type = _ARCHITECTURES[cfg.arch]
    if cfg.arch == "qwen3" and (cfg.qkv_bias or not cfg.qk_norm):
        architecture, model_type = "Qwen2ForCausalLM", "qwen2"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling["factor"])
    elif cfg.rope_scaling:
        s = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=s["factor"], low_freq_factor=s["low_freq_factor"],
                    high_freq_factor=s["high_freq_factor"],
                    original_max_position_embeddings=s["original_context_length"])
    config: dict[str, Any] = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_weights, "attention_bias": cfg.qkv_bias, "dtype": str(dtype)[6:],
        "torch_dtype": str(dtype)[6:],
    }
    if cfg.arch == "gemma3":
        # transformers 5 accepts only a whole number here (the released models use 256 or 168).
        scalar = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim
        config.update(hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                      sliding_window=cfg.sliding_window, final_logit_softcapping=cfg.final_softcap,
                      attn_logit_softcapping=None,
                      layer_types=[f"{cfg.layer_type(i)}_attention" for i in range(cfg.n_layers)],
                      rope_parameters={"full_attention": rope, "sliding_attention":
                                       {"rope_type": "default", "rope_theta": cfg.rope_local_base}},
                      rope_theta=cfg.rope_base, rope_local_base_freq=cfg.rope_local_base)
        if cfg.rope_scaling:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        config.update(hidden_act="silu", rope_parameters=rope, rope_theta=cfg.rope_base,
                      rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None)
    config.update(special or {})
    return config


def state_from_hf(tensors: dict[str, torch.Tensor] | Any, cfg: DecoderConfig, where: str) -> dict[str, torch.Tensor]:
    """gptforge-named tensors from Hugging Face-named ones (a dict or a lazy mapping)."""
    table = hf_names(cfg)
    present = set(tensors)
    ignored = {"lm_head.weight"} if cfg.tie_weights else set()  # some exports store the tied head again
    missing = sorted(set(table) - present)
    unexpected = sorted(present - set(table) - ignored)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit its config.json: missing {missing[:5] or 'none'}, "
                              f"unexpected {unexpected[:5] or 'none'}")
    return {ours: tensors[hf] for hf, ours in table.items()}


def save_hf_decoder(model, out_dir: str | Path, special: dict[str, Any] | None = None) -> Path:
    """Write `model` (a DecoderModel) as a Hugging Face directory: config.json + model.safetensors."""
    cfg = model.cfg
    state = model.state_dict()
    tensors = {hf: state[ours].detach().contiguous() for hf, ours in hf_names(cfg).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(out / "config.json", hf_decoder_config(cfg, model.emb.tok.weight.dtype, special))
    return out


def read_model_type(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
