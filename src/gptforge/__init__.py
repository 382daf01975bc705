"""gptforge: build, train, load, fine-tune and run a GPT-2-style language model in PyTorch."""

from gptforge.config import GPTConfig
from gptforge.data import GPTDataset, TokenFileDataset, create_dataloader
from gptforge.errors import BadInputError, CheckpointError, DownloadError, GptforgeError, NotFoundError
from gptforge.generate import generate, generate_stream, sample, stream_text
from gptforge.loader import load, read_run
from gptforge.model import GPTModel, create_embeddings
from gptforge.tokenizer import get_tokenizer

__version__ = "0.2.0"


load_pretrained = load  # the name gptforge 0.1 used

__all__ = [
    "BadInputError", "CheckpointError", "DownloadError", "GPTConfig", "GPTDataset", "GPTModel",
    "GptforgeError", "NotFoundError", "TokenFileDataset", "create_dataloader", "create_embeddings",
    "generate", "generate_stream", "get_tokenizer", "load", "load_pretrained", "read_run", "sample",
    "stream_text",
]
