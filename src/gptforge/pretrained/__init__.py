"""Pretrained GPT-2 weights: read OpenAI's TensorFlow and Hugging Face checkpoints, convert, save.

Each source is read into one flat GPT-2 naming, then one table (names.py) maps it
onto gptforge's parameters.
"""

from gptforge.pretrained.convert import convert
from gptforge.pretrained.hf import read_hf_checkpoint, save_hf
from gptforge.pretrained.loader import detect_format, load_pretrained
from gptforge.pretrained.names import flat_to_gptforge, gptforge_to_flat
from gptforge.pretrained.openai import read_openai_checkpoint
from gptforge.pretrained.tf_checkpoint import (
    ChecksumError,
    TFCheckpointError,
    TFCheckpointReader,
    read_tf_checkpoint,
)

__all__ = [
    "ChecksumError", "TFCheckpointError", "TFCheckpointReader", "convert", "detect_format",
    "flat_to_gptforge", "gptforge_to_flat", "load_pretrained", "read_hf_checkpoint",
    "read_openai_checkpoint", "read_tf_checkpoint", "save_hf",
]
