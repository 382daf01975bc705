"""Other people's checkpoint formats: OpenAI's TensorFlow files and Hugging Face safetensors.

Each source is read into one flat GPT-2 naming, then one table (names.py) maps it
onto gptforge's parameters. Loading a model from them is `gptforge.load`'s job.
"""

from gptforge.pretrained.hf import read_hf_checkpoint, save_hf
from gptforge.pretrained.names import flat_to_gptforge, gptforge_to_flat
from gptforge.pretrained.openai import read_openai_checkpoint
from gptforge.pretrained.tf_checkpoint import (
    ChecksumError,
    TFCheckpointError,
    TFCheckpointReader,
    read_tf_checkpoint,
)

__all__ = [
    "ChecksumError", "TFCheckpointError", "TFCheckpointReader", "flat_to_gptforge",
    "gptforge_to_flat", "read_hf_checkpoint", "read_openai_checkpoint", "read_tf_checkpoint",
    "save_hf",
]
