"""Models from the Hugging Face Hub, fetched with `huggingface_hub`.

The Hub's library gives what a user of these models expects: one shared cache
(`HF_HOME`, also used by transformers), resumed downloads, pinned revisions, and
the access token (`HF_TOKEN` or `hf auth login`) that gated models such as Llama
need. Only the files a model needs to run are fetched: its config, safetensors
weights, tokenizer and generation settings.
"""

from __future__ import annotations

import re
from pathlib import Path

from gptforge.errors import DownloadError

MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo(name: str) -> bool:
    """True for "owner/name", the form of a Hugging Face repository id."""
    return bool(_REPO_ID.match(name))


def download_model(repo_id: str, revision: str | None = None, token: str | None = None,
                   cache_dir: str | None = None) -> Path:
    """Download (or find in the cache) the files of a Hub model; return its local folder.

    Offline (`HF_HUB_OFFLINE=1`), a model already in the cache is used as it is.
    Raises DownloadError saying what to do when the repository is gated, missing or
    unreachable.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise DownloadError("downloading from the Hugging Face Hub needs `pip install huggingface_hub`") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                   allow_patterns=MODEL_FILES)
    except GatedRepoError:
        raise DownloadError(f"{repo_id} is a gated model: accept its licence on https://huggingface.co/{repo_id} "
                            f"and log in (`hf auth login`, or set HF_TOKEN), then try again") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise DownloadError(f"{repo_id} is not in the Hugging Face cache and the Hub cannot be reached "
                            f"(offline?): download it on a machine with internet, or pass a local "
                            f"directory with config.json and the safetensors files") from None
    except (HfHubHTTPError, OSError) as err:
        raise DownloadError(f"downloading {repo_id} from the Hugging Face Hub failed: {err}") from None
    return Path(folder)
