"""Where and how training computes: the device, the precision, the allocator, the process group.

Nothing here knows about models or data; the Trainer asks these functions once,
when it starts.
"""

from __future__ import annotations

import ctypes
import os

import torch

from gptforge.errors import BadInputError

PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA (the GPU of this process's LOCAL_RANK), then Apple's MPS, then the CPU."""
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            raise BadInputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain float32.

    "auto" is bfloat16 on GPUs that support it and float32 everywhere else.
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context that runs matmuls in `dtype` on `device` (None: autocast off)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def tune_malloc() -> None:
    """Keep glibc from handing big freed blocks back to the OS after every step.

    Training allocates and frees the same large tensors (logits, the embedding
    gradient) every step. By default glibc serves each one with a fresh mmap, so
    every step page-faults hundreds of megabytes in again (zeroing a 154 MB
    gradient took 90-400 ms instead of 8). Serving all blocks from the heap and
    never trimming it lets each step reuse the memory of the step before.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)  # no mmap'ed blocks: everything from the heap
    libc.mallopt(m_trim_threshold, 1 << 31)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun sets RANK and WORLD_SIZE; alone, (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def wrap_distributed(model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and wrap `model` in DDP;
    None when this is the only process."""
    if process_rank()[1] == 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over every process in place (a no-op alone)."""
    if process_rank()[1] > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def finish_distributed() -> None:
    """Wait for every process, then shut the process group down cleanly (exiting with
    gloo's threads still running aborts the process)."""
    if process_rank()[1] == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
