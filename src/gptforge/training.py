"""The one training loop, shared by pretraining, classification and instruction tuning.

Tasks differ only by their datasets, collate function, loss and metrics; the loop
does the rest: batching with a resumable (and, under torchrun, sharded) sampler,
AdamW, LR warmup + cosine decay, gradient accumulation and clipping, bf16 autocast
where the device supports it, torch.compile, periodic evaluation, metrics, plots,
checkpoints (last N and best), exact resume, and a clean save on Ctrl-C.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from gptforge.checkpoint import atomic_torch_save, atomic_write_bytes

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# A metric returns (sum, count) over a batch, so batches of any size combine exactly.
MetricFn = Callable[[nn.Module, Any], tuple[float, int]]
STATE_NAME = "training_state.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Settings of a training run; every field is also a command-line flag."""

    epochs: int = 10
    max_steps: int | None = None  # budget in optimizer steps (overrides epochs)
    max_tokens: int | None = None  # budget in input tokens (overrides epochs)
    batch_size: int = 2  # per optimizer micro-step, over all processes
    grad_accum: int = 1
    lr: float = 4e-4
    min_lr: float | None = None  # cosine decay floor; None keeps the LR constant after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    eval_every: int = 5
    eval_batches: int | None = 5  # None evaluates on the whole split
    save_every: int | None = None  # steps between checkpoints; None saves at the end (and on Ctrl-C)
    keep_last: int = 2
    seed: int = 123
    device: str = "auto"
    precision: str = "auto"  # "auto", "fp32", "bf16"
    compile: bool = False
    num_workers: int = 0
    stop_after: int | None = None  # pause (save and return) after this step, to resume later


def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain float32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


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


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices in an order fixed by (seed, epoch), startable mid-epoch.

    Under distributed training every process computes the same global order and
    takes its own slice of each global batch, so W processes with batch B/W see
    exactly the batches one process with batch B would see.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of "
                             f"processes ({world_size})")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.batch_size // self.world_size
        for b in range(self.start_batch, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world_size > 1:
                batch = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield batch


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False


class Trainer:
    """Train `model` on `train_data` with `loss_fn`, evaluating on `val_data`.

    `save_model(model, directory, **meta)` writes the model files of a checkpoint
    (the task decides the format: a full model, a classifier, LoRA adapters).
    Callbacks: `on_eval(record)` after each evaluation and `on_epoch_end(epoch)`.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset | None,
        loss_fn: LossFn,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        save_model: Callable[..., Any],
        collate_fn: Callable | None = None,
        metrics: dict[str, MetricFn] | None = None,
        on_eval: Callable[[dict], None] | None = None,
        on_epoch_end: Callable[[int], None] | None = None,
        progress: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.loss_fn, self.metrics = cfg, loss_fn, metrics or {}
        self.out_dir = Path(out_dir)
        self.save_model_fn, self.meta = save_model, meta or {}
        self.on_eval, self.on_epoch_end, self.progress = on_eval, on_epoch_end, progress
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.device = pick_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        if self.device.type == "cpu":
            tune_malloc()
        self.model = model.to(self.device)
        self.ddp = self._setup_distributed()
        self.train_model = self.ddp or self.model
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

        if len(train_data) == 0:
            raise ValueError("the training set is empty")
        self.collate_fn = collate_fn
        self.train_sampler = ResumableBatchSampler(len(train_data), cfg.batch_size, True, True,
                                                   cfg.seed, self.rank, self.world_size)
        if len(self.train_sampler) == 0:
            raise ValueError(f"the training set has {len(train_data)} examples, fewer than one batch "
                             f"of {cfg.batch_size}: lower --batch-size or add data")
        self.train_loader = self._loader(train_data, self.train_sampler)
        self.train_eval_loader = self._loader(train_data, self._eval_sampler(train_data))
        self.val_loader = self._loader(val_data, self._eval_sampler(val_data)) if val_data else None

        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        if not decay and not no_decay:
            raise ValueError("the model has no trainable parameters")
        # Weight decay applies to matrices only, not to biases and LayerNorm gains.
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=self.device.type in ("cuda", "cpu") or None,
        )
        self.steps_per_epoch = len(self.train_sampler) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError("grad_accum is larger than the number of batches in one epoch")
        self.tokens_per_step = None  # learned from the first batch
        self.total_steps = self._total_steps(train_data)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.epoch, self.batch_in_epoch, self.tokens_seen = 0, 0, 0, 0
        self.best_val = math.inf
        self.history: list[dict] = []

    # -- setup -----------------------------------------------------------------------
    def _setup_distributed(self) -> nn.Module | None:
        if self.world_size == 1:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _eval_sampler(self, data: Dataset | None) -> ResumableBatchSampler | None:
        if data is None or len(data) == 0:
            return None
        size = max(self.cfg.batch_size, self.world_size)
        size -= size % self.world_size
        return ResumableBatchSampler(len(data), size, False, self.world_size > 1, self.cfg.seed,
                                     self.rank, self.world_size)

    def _loader(self, data: Dataset | None, sampler: Sampler | None) -> DataLoader | None:
        if data is None or sampler is None or len(sampler) == 0:
            return None
        # A private generator: creating a loader iterator must not draw from the global RNG,
        # or a resumed run's dropout masks would differ from an uninterrupted run's.
        return DataLoader(data, batch_sampler=sampler, collate_fn=self.collate_fn,
                          num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def _total_steps(self, data: Dataset) -> int:
        cfg = self.cfg
        if cfg.max_steps:
            return cfg.max_steps
        if cfg.max_tokens:
            window = len(data[0][0]) if isinstance(data[0], (tuple, list)) else 1
            return max(1, math.ceil(cfg.max_tokens / (cfg.batch_size * cfg.grad_accum * window)))
        return cfg.epochs * self.steps_per_epoch

    def _lr_factor(self, step: int) -> float:
        """Linear warmup to the full LR, then cosine decay to min_lr (or constant)."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.min_lr is None:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    # -- one step ----------------------------------------------------------------------
    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @staticmethod
    def _count_tokens(batch: Any) -> int:
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return first.numel() if isinstance(first, torch.Tensor) else len(first)

    def _train_step(self, micro_batches: Sequence[Any]) -> float:
        self.train_model.train()
        total = 0.0
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            last = i == len(micro_batches) - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext()
            with sync:
                with self._autocast():
                    loss = self.loss_fn(self.train_model, batch) / len(micro_batches)
                loss.backward()
            total += loss.detach().float()
            self.tokens_seen += self._count_tokens(batch) * self.world_size
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    # -- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: DataLoader | None, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss (and each metric) over the first `max_batches` batches of `loader`."""
        if loader is None:
            return {}
        self.model.eval()
        sums = torch.zeros(2 + 2 * len(self.metrics), dtype=torch.float64)
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            batch = self._to_device(batch)
            with self._autocast():
                sums[0] += float(self.loss_fn(self.model, batch))
            sums[1] += 1
            for j, fn in enumerate(self.metrics.values()):
                value, count = fn(self.model, batch)
                sums[2 + 2 * j] += value
                sums[3 + 2 * j] += count
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        out = {"loss": float(sums[0] / max(sums[1], 1))}
        for j, name in enumerate(self.metrics):
            out[name] = float(sums[2 + 2 * j] / max(sums[3 + 2 * j], 1))
        return out

    def _evaluate_and_log(self, recent_losses: list[float], tokens_per_s: float) -> dict:
        n = self.cfg.eval_batches
        train, val = self.evaluate(self.train_eval_loader, n), self.evaluate(self.val_loader, n)
        loss = torch.tensor(sum(recent_losses) / max(1, len(recent_losses)), dtype=torch.float64)
        if self.world_size > 1:  # each process saw its share of the batch: average them
            import torch.distributed as dist

            dist.all_reduce(loss)
            loss /= self.world_size
        record = {"step": self.step, "epoch": self.epoch + 1, "tokens_seen": self.tokens_seen,
                  "loss": float(loss),
                  "train_loss": train.get("loss"), "val_loss": val.get("loss"),
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s}
        for name in self.metrics:
            record[f"train_{name}"], record[f"val_{name}"] = train.get(name), val.get(name)
        self.history.append(record)
        if self.rank == 0:
            with open(self.out_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.on_eval:
                self.on_eval(record)
        return record

    # -- checkpoints -----------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _set_rng_state(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def save_checkpoint(self, rng_state: dict[str, Any] | None = None, periodic: bool = False) -> None:
        """Write the model and the full training state to the run directory (rank 0 only).

        A periodic checkpoint also keeps a copy under checkpoints/step-N (the last
        `keep_last` of them) and, when its validation loss is the lowest so far, in best/.
        """
        if self.rank != 0:
            return
        meta = {**self.meta, "step": self.step}
        self.save_model_fn(self.model, self.out_dir, **meta)
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state or self._rng_state(), "history": self.history,
                 "config": asdict(self.cfg)}
        atomic_torch_save(state, self.out_dir / STATE_NAME)
        if not periodic:
            return
        if self.cfg.keep_last > 0:
            self.save_model_fn(self.model, self.out_dir / "checkpoints" / f"step-{self.step:07d}", **meta)
            for old in sorted((self.out_dir / "checkpoints").glob("step-*"))[:-self.cfg.keep_last]:
                _remove_tree(old)
        val = self.history[-1].get("val_loss") if self.history else None
        if val is not None and val < self.best_val:
            self.best_val = val
            self.save_model_fn(self.model, self.out_dir / "best", **meta, val_loss=val)

    def resume(self, run_dir: str | os.PathLike | None = None) -> None:
        """Restore optimizer, schedule, RNG and data position saved in `run_dir`.

        The model weights must already be the run's (the task loads them from the
        same directory); this restores everything else, so training continues as
        if it had never stopped.
        """
        path = Path(run_dir or self.out_dir) / STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no training state ({STATE_NAME}) to resume from")
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved_step = self.meta_step(path.parent)
        if saved_step is not None and saved_step != state["step"]:
            raise RuntimeError(f"{path.parent}: the weights are from step {saved_step} but the "
                               f"training state from step {state['step']}; the last save was cut off")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.tokens_seen = state["batch_in_epoch"], state["tokens_seen"]
        self.best_val, self.history = state["best_val"], state["history"]
        self._set_rng_state(state["rng"])

    @staticmethod
    def meta_step(run_dir: Path) -> int | None:
        meta = run_dir / "gptforge.json"
        return json.loads(meta.read_text()).get("step") if meta.is_file() else None

    # -- the loop --------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until the budget (epochs, steps or tokens) is spent; return the history."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        if self.rank == 0:
            atomic_write_bytes(self.out_dir / "train_config.json",
                               (json.dumps(asdict(cfg), indent=2) + "\n").encode())
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        recent: list[float] = []
        t_last, tokens_last = time.perf_counter(), self.tokens_seen
        rng_at_step_start = self._rng_state()
        interrupted = False
        try:
            while self.step < self.total_steps:
                self.train_sampler.epoch = self.epoch
                self.train_sampler.start_batch = self.batch_in_epoch
                micro: list[Any] = []
                for batch in self.train_loader:
                    micro.append(batch)
                    if len(micro) < cfg.grad_accum:
                        continue
                    rng_at_step_start = self._rng_state()
                    recent.append(self._train_step(micro))
                    micro = []
                    self.step += 1
                    self.batch_in_epoch += cfg.grad_accum
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{recent[-1]:.3f}", epoch=self.epoch + 1)
                    if (self.step - 1) % cfg.eval_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        rate = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                        self._evaluate_and_log(recent, rate)
                        recent, t_last, tokens_last = [], time.perf_counter(), self.tokens_seen
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint(periodic=True)
                    if self.step >= self.total_steps or self.step == cfg.stop_after:
                        break
                if self.batch_in_epoch + cfg.grad_accum > len(self.train_sampler):
                    # The epoch ran out of batches (a partial accumulation is dropped).
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if self.on_epoch_end and self.rank == 0:
                        self.on_epoch_end(self.epoch)
                if self.step == cfg.stop_after and self.step < self.total_steps:
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: saving a checkpoint at step %d to resume from", self.step)
            # The step in flight is dropped; its RNG draws are rewound with it.
            self.save_checkpoint(rng_at_step_start)
            raise
        finally:
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        if self.rank == 0:
            self.plot()
        self._finish_distributed()
        return TrainResult(self.step, self.tokens_seen, self.history, interrupted)

    def _finish_distributed(self) -> None:
        """Wait for every process, then shut the process group down cleanly (exiting with
        gloo's threads still running aborts the process)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def plot(self) -> Path | None:
        """Write loss.png (and one PNG per metric) from the history; needs matplotlib."""
        if not self.history:
            return None
        from gptforge.plotting import plot_history

        return plot_history(self.history, self.out_dir, list(self.metrics))


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
