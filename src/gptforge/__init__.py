"""gptforge: build, train, load, fine-tune and run a GPT-2-style language model in PyTorch."""

from gptforge.config import GPTConfig
from gptforge.data import GPTDataset, TokenFileDataset, create_dataloader
from gptforge.generate import generate, generate_stream, sample, stream_text
from gptforge.model import GPTModel, create_embeddings
from gptforge.tokenizer import get_tokenizer

__version__ = "0.1.0"


def load_pretrained(source, **kwargs):
    """Load a GPTModel from a preset name, an OpenAI or Hugging Face checkpoint, or a gptforge run.

    See `gptforge.pretrained.load_pretrained` for the accepted sources.
    """
    from gptforge.pretrained import load_pretrained as _load

    return _load(source, **kwargs)


__all__ = [
    "GPTConfig", "GPTModel", "GPTDataset", "TokenFileDataset", "create_dataloader",
    "create_embeddings", "generate", "generate_stream", "get_tokenizer", "load_pretrained",
    "sample", "stream_text",
]
