"""Write a model as one GGUF file, the format llama.cpp and Ollama run.

A GGUF file is a header of typed key-value metadata (the architecture's sizes, the
tokenizer, the chat template) followed by named tensors, each in its own data type. This
module writes GPT-2 (llama.cpp's "gpt2" architecture), Llama 3 ("llama"), Qwen3
("qwen3"; "qwen2" for a Qwen with q/k/v biases) and Gemma 3 ("gemma3") with the `gguf`
package, under the tensor names and layouts llama.cpp's own converter
(convert_hf_to_gguf.py) produces. What differs from the Hugging Face layout:

- GPT-2: q, k and v stay fused in `attn_qkv` ([3D, D], nn.Linear's [out, in]); the output
  head is written out even when tied to the embedding, as llama.cpp's converter does.
- Llama: the rows of q and k are reordered within each head. Hugging Face rotates the two
  halves of a head (i with i + head_dim/2); llama.cpp's Llama rotates neighbouring pairs
  (2i with 2i+1), so row i goes to 2i and row i + head_dim/2 to 2i+1 (`permute_for_pairs`).
  Llama 3.1's RoPE scaling travels as a `rope_freqs` tensor of per-frequency divisors.
- Gemma 3: norm weights are stored as 1 + w (gptforge, like transformers, stores w and
  multiplies by 1 + w; llama.cpp multiplies by the stored weight).
- Qwen3 and Gemma 3 rotate halves, as Hugging Face does: no reordering.

Data types: "f32" keeps everything in float32; "f16" and "q8_0" convert the matrices and
keep one-dimensional tensors (norms, biases, `rope_freqs`) and GPT-2's position embedding
in float32, as llama.cpp's converter does. q8_0 stores blocks of 32 values as int8 with one
float16 scale each; a matrix whose rows are not a multiple of 32 long falls back to f16.
The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gptforge.errors import BadInputError, GptforgeError
from gptforge.families import DecoderConfig
from gptforge.fileio import fsync_dir

logger = logging.getLogger(__name__)

__all__ = ["GGUFDependencyError", "gguf_arch", "permute_for_pairs", "write_gguf"]

# gptforge arch -> llama.cpp architecture, and the pre-tokenizer llama.cpp knows the family's by.
ARCHS = {"gpt2": "gpt2", "llama3": "llama", "qwen3": "qwen3", "gemma3": "gemma3"}
PRE_TOKENIZERS = {"gpt2": "gpt-2", "llama": "llama-bpe", "qwen3": "qwen2", "qwen2": "qwen2"}


class GGUFDependencyError(GptforgeError, ImportError):
    """The `gguf` package, needed to write GGUF files, is not installed."""


def _import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise GGUFDependencyError("Writing GGUF files needs the `gguf` package: pip install gguf") from exc
    return gguf


def gguf_arch(cfg) -> str:
    """llama.cpp's architecture name for a model config."""
    if not isinstance(cfg, DecoderConfig):
        return "gpt2"
    if cfg.arch == "qwen3" and (cfg.qkv_bias or not cfg.qk_norm):
        return "qwen2"  # Qwen2's layout: q/k/v biases, no q/k norms
    return ARCHS[cfg.arch]


def permute_for_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (n_heads * head_dim, D) from rotating halves to pairs.

    Within each head, row i moves to 2i and row i + head_dim/2 to 2i + 1, so RoPE on
    neighbouring pairs (llama.cpp's Llama) gives what RoPE on halves gave.
    """
    out_dim = weight.shape[0]
    head_dim = out_dim // n_heads
    # (heads, 2 halves, head_dim/2, ...) -> (heads, head_dim/2, 2, ...): the halves interleave
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


# ------------------------------------------------------------------------------------
# tensors: (GGUF name, function giving the float32 tensor) in writing order

TensorList = list[tuple[str, Callable[[], torch.Tensor]]]


# (gptforge name in a block, GGUF name in a block) for GPT-2; ".weight" and ".bias" each.
_GPT2_BLOCK = [("norm1", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
               ("norm2", "ffn_norm"), ("ff.fc", "ffn_up"), ("ff.proj", "ffn_down")]


def _gpt2_tensors(model) -> TensorList:
    cfg, state = model.cfg, model.state_dict()

    def get(name: str) -> Callable[[], torch.Tensor]:
        if name not in state and name.endswith("attn.qkv.bias"):
            # A model without q/k/v biases: llama.cpp's GPT-2 needs them; zeros are the same function.
            return lambda: torch.zeros(3 * cfg.emb_dim)
        return lambda: state[name]

    tensors: TensorList = [("token_embd.weight", get("emb.tok.weight")),
                           ("position_embd.weight", get("emb.pos.weight"))]
    for i in range(cfg.n_layers):
        for ours, theirs in _GPT2_BLOCK:
            for kind in ("weight", "bias"):
                tensors.append((f"blk.{i}.{theirs}.{kind}", get(f"blocks.{i}.{ours}.{kind}")))
    tensors += [("output_norm.weight", get("final_norm.weight")), ("output_norm.bias", get("final_norm.bias")),
                ("output.weight", get("out_head.weight"))]
    return tensors


# (gptforge name in a block, GGUF name in a block) for Llama, Qwen and Gemma.
_DECODER_BLOCK = [
    ("norm1.weight", "attn_norm.weight"),
    ("attn.q.weight", "attn_q.weight"), ("attn.q.bias", "attn_q.bias"),
    ("attn.k.weight", "attn_k.weight"), ("attn.k.bias", "attn_k.bias"),
    ("attn.v.weight", "attn_v.weight"), ("attn.v.bias", "attn_v.bias"),
    ("attn.q_norm.weight", "attn_q_norm.weight"), ("attn.k_norm.weight", "attn_k_norm.weight"),
    ("attn.proj.weight", "attn_output.weight"),
    ("post_attn_norm.weight", "post_attention_norm.weight"),  # Gemma 3
    ("norm2.weight", "ffn_norm.weight"),  # Gemma 3's pre-feed-forward norm has this GGUF name too
    ("post_ff_norm.weight", "post_ffw_norm.weight"),  # Gemma 3
    ("ff.gate.weight", "ffn_gate.weight"), ("ff.up.weight", "ffn_up.weight"), ("ff.down.weight", "ffn_down.weight"),
]


def _decoder_tensors(model, arch: str) -> TensorList:
    from gptforge.layers import rope_frequencies

    cfg: DecoderConfig = model.cfg
    state = model.state_dict()

    def get(name: str) -> Callable[[], torch.Tensor]:
        fn = lambda: state[name]  # noqa: E731
        if cfg.gemma_norms and "norm" in name.rsplit(".", 2)[-2]:  # norm1, q_norm, post_ff_norm, final_norm
            return lambda: fn().float() + 1.0
        if arch == "llama" and name.endswith(("attn.q.weight", "attn.k.weight")):
            heads = cfg.n_heads if ".q." in name else cfg.n_kv_heads
            return lambda: permute_for_pairs(fn(), heads)
        return fn

    tensors: TensorList = [("token_embd.weight", get("emb.tok.weight"))]
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3":
        # llama.cpp divides each RoPE frequency by this tensor's entry: plain over scaled.
        def factors() -> torch.Tensor:
            plain = rope_frequencies(cfg.head_dim, cfg.rope_base)
            return plain / rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)

        tensors.append(("rope_freqs.weight", factors))
    for i in range(cfg.n_layers):
        for ours, theirs in _DECODER_BLOCK:
            name = f"blocks.{i}.{ours}"
            if name in state:
                tensors.append((f"blk.{i}.{theirs}", get(name)))
            elif arch == "qwen2" and ours.startswith(("attn.q.bias", "attn.k.bias", "attn.v.bias")):
                width = (cfg.n_heads if ".q." in ours else cfg.n_kv_heads) * cfg.head_dim
                tensors.append((f"blk.{i}.{theirs}", lambda width=width: torch.zeros(width)))
    tensors.append(("output_norm.weight", get("final_norm.weight")))
    if not cfg.tie_weights:
        tensors.append(("output.weight", get("out_head.weight")))
    return tensors


def _storage(gguf, name: str, shape: tuple[int, ...], file_type: str):
    """The GGML type a tensor of `shape` is stored as in a file of `file_type`."""
    types = gguf.GGMLQuantizationType
    keep_f32 = (file_type == "f32" or len(shape) <= 1 or name.endswith("_norm.weight")
                or name in ("position_embd.weight", "rope_freqs.weight"))
    if keep_f32:
        return types.F32
    if file_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
        return types.Q8_0
    return types.F16


def _encoded(gguf, array: np.ndarray, qtype) -> np.ndarray:
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return array
    if qtype == types.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


# ------------------------------------------------------------------------------------
# the tokenizer

def _gpt2_vocab(gguf) -> tuple[list[str], list[int], list[str]]:
    """GPT-2's tokens, token types and merges, from OpenAI's encoder.json and vocab.bpe."""
    from gptforge.hf_tokenizer import gpt2_merges
    from gptforge.tokenizer import _load_files

    encoder_json, vocab_bpe = _load_files(None)
    encoder: dict[str, int] = json.loads(encoder_json)
    tokens = [""] * len(encoder)
    for text, i in encoder.items():
        tokens[i] = text
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    types[encoder["<|endoftext|>"]] = int(gguf.TokenType.CONTROL)
    merges = [f"{a} {b}" for a, b in gpt2_merges(vocab_bpe)]
    return tokens, types, merges


def _hf_vocab(gguf, tokenizer) -> tuple[list[str], list[int], list[str], list[float] | None, str]:
    """tokens, token types, merges, scores (or None) and tokenizer model of an HFTokenizer."""
    backend = tokenizer._backend
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise BadInputError(f"the tokenizer's model is {model.get('type')!r}; only BPE tokenizers (Llama 3, Qwen, "
                            "Gemma 3) can be written to GGUF here")
    added = backend.get_added_tokens_decoder()
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(tokenizer.n_vocab):
        text = backend.id_to_token(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(text)
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        elif tokenizer._byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(int(gguf.TokenType.BYTE))
        else:
            tokens.append(text)
            types.append(int(gguf.TokenType.UNKNOWN if text == unk else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if tokenizer._alphabet is not None:  # byte-level BPE: llama.cpp's "gpt2" tokenizer
        return tokens, types, merges, None, "gpt2"
    # A SentencePiece-style BPE (Gemma): llama.cpp's "llama" tokenizer merges by token score,
    # higher first; SentencePiece BPE vocabularies list tokens in merge order.
    scores = [-float(i) if t == int(gguf.TokenType.NORMAL) else 0.0 for i, t in enumerate(types)]
    return tokens, types, [], scores, "llama"


def _unknown_id(tokenizer) -> int | None:
    """The id of the tokenizer's unknown token, if it has one (GPT-2's byte-level BPE has none)."""
    from gptforge.hf_tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer):
        return None
    text = tokenizer.special_tokens_map.get("unk_token") or json.loads(tokenizer._backend.to_str())["model"].get(
        "unk_token")
    return tokenizer._backend.token_to_id(text) if text else None


def _add_tokenizer(writer, gguf, model_cfg, arch: str, tokenizer, tokens) -> None:
    from gptforge.hf_tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        token_list, types, merges, scores, kind = _hf_vocab(gguf, tokenizer)
    else:
        token_list, types, merges = _gpt2_vocab(gguf)
        scores, kind = None, "gpt2"
    if len(token_list) > model_cfg.vocab_size:
        raise BadInputError(f"the tokenizer has {len(token_list)} tokens but the model only {model_cfg.vocab_size} "
                            "embeddings; llama.cpp needs one embedding per token")
    for i in range(len(token_list), model_cfg.vocab_size):  # embeddings no token uses
        token_list.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
        if scores is not None:
            scores.append(0.0)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(PRE_TOKENIZERS.get(arch, "default") if kind == "gpt2" else "default")
    writer.add_token_list(token_list)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)
    if merges:
        writer.add_token_merges(merges)
    if tokens.bos_token_id is not None:
        writer.add_bos_token_id(tokens.bos_token_id)
    if tokens.eos_ids:
        writer.add_eos_token_id(tokens.eos_ids[0])
        if tokens.chat_template:
            writer.add_eot_token_id(tokens.eos_ids[0])
    if tokens.pad_id is not None:
        writer.add_pad_token_id(tokens.pad_id)
    unk = _unknown_id(tokenizer)
    if unk is not None:  # else llama.cpp's SentencePiece vocabulary takes id 0
        writer.add_unk_token_id(unk)
    writer.add_add_bos_token(tokens.add_bos)
    writer.add_add_eos_token(False)
    if tokens.chat_template:
        writer.add_chat_template(tokens.chat_template)


# ------------------------------------------------------------------------------------
# the architecture's metadata

def _add_hparams(writer, gguf, cfg, arch: str) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * cfg.emb_dim)
        writer.add_head_count_kv(cfg.n_heads)
        writer.add_layer_norm_eps(cfg.ln_eps)
        return
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.rope_local_base is not None:
            writer.add_rope_freq_base_swa(cfg.rope_local_base)
        if cfg.final_softcap:
            writer.add_final_logit_softcapping(float(cfg.final_softcap))
        standard = [("full" if (i + 1) % 6 == 0 else "sliding") for i in range(cfg.n_layers)]
        if [cfg.layer_type(i) for i in range(cfg.n_layers)] != standard:
            logger.warning("this Gemma 3 does not make every 6th layer global, as llama.cpp assumes")
        if cfg.query_scale not in (None, cfg.head_dim, cfg.emb_dim // cfg.n_heads):
            logger.warning("llama.cpp scales Gemma 3's attention by 1/sqrt(head_dim), not 1/sqrt(%s)", cfg.query_scale)


# ------------------------------------------------------------------------------------

_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model, path: str | os.PathLike, tokenizer, tokens, file_type: str = "f16", *,
               name: str | None = None) -> Path:
    """Write `model` with its tokenizer into the GGUF file `path`; returns the path.

    `tokens` (an `hf_export.ExportTokens`) gives the special-token ids and the chat
    template; `file_type` is "f32", "f16" or "q8_0" (see the module docstring). Tensors are
    converted one at a time while the file is written, so writing needs the model's size in
    memory plus one tensor. The file appears under its name only once complete.
    """
    gguf = _import_gguf()
    if file_type not in _FILE_TYPES:
        raise BadInputError(f"unknown GGUF type {file_type!r}; choose one of {', '.join(_FILE_TYPES)}")
    cfg = model.cfg
    arch = gguf_arch(cfg)
    tensors = _gpt2_tensors(model) if arch == "gpt2" else _decoder_tensors(model, arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name or path.stem)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[file_type])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, gguf, cfg, arch)
        _add_tokenizer(writer, gguf, cfg, arch, tokenizer, tokens)
        plans = []
        for tensor_name, fn in tensors:
            # Only the shape, now: the header lists every tensor before the first one's data.
            shape = tuple(fn().shape)
            plans.append((tensor_name, fn, shape, _storage(gguf, tensor_name, shape, file_type)))
        for tensor_name, _, shape, qtype in plans:
            byte_shape, dtype = _stored_shape(gguf, shape, qtype)
            nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(tensor_name, byte_shape, np.dtype(dtype), nbytes,
                                   raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, fn, _, qtype in plans:
            array = fn().detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
            writer.write_tensor_data(_encoded(gguf, array, qtype))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _stored_shape(gguf, shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], type]:
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return shape, np.float32
    if qtype == types.F16:
        return shape, np.float16
    return tuple(gguf.quants.quant_shape_to_byte_shape(shape, qtype)), np.uint8
