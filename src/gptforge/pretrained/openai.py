"""Read OpenAI's released GPT-2 checkpoints (TensorFlow + hparams.json) into the flat naming.

OpenAI's directory holds `hparams.json`, the `checkpoint` bookkeeping file and
`model.ckpt.{index,data-00000-of-00001,meta}`. Variables are named
`model/wte`, `model/wpe`, `model/h{i}/{ln_1,ln_2}/{g,b}`,
`model/h{i}/attn/{c_attn,c_proj}/{w,b}`, `model/h{i}/mlp/{c_fc,c_proj}/{w,b}` and
`model/ln_f/{g,b}`; the conv weights `w` are stored [1, in, out].
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from gptforge.config import GPTConfig
from gptforge.errors import CheckpointError, NotFoundError
from gptforge.pretrained.tf_checkpoint import TFCheckpointReader

HPARAMS_NAME = "hparams.json"

# OpenAI TF variable name -> flat name (see names.py); conv weights lose their leading 1.
_TF_NAMES: tuple[tuple[str, str], ...] = (
    (r"model/wte", "wte.weight"),
    (r"model/wpe", "wpe.weight"),
    (r"model/ln_f/g", "ln_f.weight"),
    (r"model/ln_f/b", "ln_f.bias"),
    (r"model/h(\d+)/(ln_1|ln_2)/g", r"h.\1.\2.weight"),
    (r"model/h(\d+)/(ln_1|ln_2)/b", r"h.\1.\2.bias"),
    (r"model/h(\d+)/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/w", r"h.\1.\2.weight"),
    (r"model/h(\d+)/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/b", r"h.\1.\2.bias"),
)
# Training state that TensorFlow may save next to the weights (Adam slots, step counter).
_TRAINING_STATE = re.compile(r"(^|/)(global_step|beta[12]_power|Adam(_\d+)?)$")


def config_from_hparams(hparams: dict) -> GPTConfig:
    """The GPTConfig of an OpenAI `hparams.json`.

    OpenAI's GPT-2 has QKV biases, an output head tied to the token embedding and
    LayerNorm epsilon 1e-5. hparams.json says nothing about dropout, so the
    loaded model has drop_rate 0.0 (right for inference; set a rate before
    fine-tuning if you want one).
    """
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    missing = [k for k in keys if k not in hparams]
    if missing:
        raise CheckpointError(f"{HPARAMS_NAME} lacks {', '.join(missing)}; it needs all of "
                         f"{', '.join(keys)}")
    return GPTConfig(
        vocab_size=int(hparams["n_vocab"]), context_length=int(hparams["n_ctx"]),
        emb_dim=int(hparams["n_embd"]), n_heads=int(hparams["n_head"]),
        n_layers=int(hparams["n_layer"]), drop_rate=0.0, qkv_bias=True, tie_weights=True,
        ln_eps=1e-5,
    )


def tf_to_flat_name(name: str) -> str | None:
    """The flat name of an OpenAI TF variable, or None if it is not a GPT-2 weight."""
    for pattern, replacement in _TF_NAMES:
        flat, n = re.subn(f"^{pattern}$", replacement, name)
        if n:
            return flat.replace("/", ".")
    return None


def read_openai_checkpoint(path: str | Path, *,
                           verify: bool = True) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Read an OpenAI GPT-2 directory into (config, flat-named tensors).

    `path` is the directory with `hparams.json` and the TF checkpoint (or the
    checkpoint prefix inside it). The arrays view the memory-mapped data file
    (read-only, no copy). Every tensor's CRC-32C is checked unless `verify=False`.
    TensorFlow optimizer state is skipped; any other unknown variable is kept
    under its TF name, so that loading reports it as unexpected.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    hparams_file = directory / HPARAMS_NAME
    if not hparams_file.is_file():
        raise NotFoundError(
            f"{hparams_file} not found: an OpenAI GPT-2 checkpoint directory has hparams.json "
            f"next to model.ckpt.index")
    cfg = config_from_hparams(json.loads(hparams_file.read_text()))
    reader = TFCheckpointReader(path, verify=verify)
    flat: dict[str, np.ndarray] = {}
    for tf_name in reader.names():
        if _TRAINING_STATE.search(tf_name):
            continue
        value = reader.read(tf_name)
        flat_name = tf_to_flat_name(tf_name)
        if flat_name is None:
            flat[tf_name] = value
            continue
        if flat_name.endswith(".weight") and value.ndim == 3 and value.shape[0] == 1:
            value = value[0]  # conv weight [1, in, out] -> [in, out]
        flat[flat_name] = value
    return cfg, flat
