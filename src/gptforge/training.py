"""The one training loop, shared by pretraining, classification and instruction tuning.

Tasks differ only by their datasets, collate function, loss and metrics; the loop
does the rest: batching with a resumable (and, under torchrun, sharded) sampler,
AdamW, LR warmup + cosine decay, gradient accumulation and clipping, autocast,
torch.compile, periodic evaluation, metrics, plots, checkpoints and exact resume,
and a clean save on Ctrl-C. Where it computes is `runtime`'s business; how a run
is kept on disk, `train_state`'s.

Callbacks receive the trainer, as minGPT's do: `trainer.add_callback("on_eval", fn)`
calls `fn(trainer)` after each evaluation (the record is `trainer.history[-1]`),
and "on_epoch_end" after each epoch (`trainer.epoch` epochs are done).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from gptforge import faults, runtime, train_state
from gptforge.checkpoint import BASE_DIR, META_NAME, RunMeta, save_model
from gptforge.data import GlobalSeedBatchSampler, ResumableBatchSampler
from gptforge.errors import BadInputError, GptforgeError
from gptforge.fileio import atomic_write_json
from gptforge.finetune.lora import has_lora, without_lora

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# A metric returns (sum, count) over a batch, so batches of any size combine exactly.
MetricFn = Callable[[nn.Module, Any], tuple[float, int]]
Callback = Callable[["Trainer"], None]
EVENTS = ("on_eval", "on_epoch_end")


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of next-token predictions; target -100 marks ignored positions."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


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

    def __post_init__(self) -> None:
        """Refuse settings that cannot train, naming the flag and what it takes."""
        problems = []

        def need(ok: bool, flag: str, what: str) -> None:
            if not ok:
                problems.append(f"--{flag.replace('_', '-')} must be {what}, not {getattr(self, flag)!r}")

        def whole(value, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("epochs", "batch_size", "grad_accum", "eval_every"):
            need(whole(getattr(self, name), 1), name, "a whole number of at least 1")
        for name in ("max_steps", "max_tokens", "eval_batches", "save_every", "stop_after"):
            value = getattr(self, name)
            need(value is None or whole(value, 1), name, "a whole number of at least 1 (or left out)")
        for name in ("warmup_steps", "keep_last", "num_workers"):
            need(whole(getattr(self, name), 0), name, "a whole number of at least 0")
        need(number(self.lr) and self.lr > 0, "lr", "a finite number above 0")
        need(self.min_lr is None or (number(self.min_lr) and 0 <= self.min_lr <= (self.lr if number(self.lr) else 0)),
             "min_lr", "a finite number from 0 to --lr")
        need(number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number of at least 0")
        need(self.grad_clip is None or (number(self.grad_clip) and self.grad_clip >= 0), "grad_clip",
             "a finite number of at least 0 (0 turns clipping off)")
        need(len(self.betas) == 2 and all(number(b) and 0 <= b < 1 for b in self.betas), "betas",
             "two numbers in [0, 1)")
        need(self.precision in runtime.PRECISIONS, "precision", f"one of {', '.join(runtime.PRECISIONS)}")
        if problems:
            raise BadInputError("; ".join(problems))


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False


class Trainer:
    """Train `model` on `train_data` with `loss_fn`, evaluating on `val_data`.

    Checkpoints go to `out_dir` with `meta` (the task's RunMeta: what the run is,
    where its weights started); a model with LoRA adapters is saved as adapters
    only. `metrics` are evaluated with the loss; see the module docstring for
    callbacks.

    `book_exact` draws random numbers as the book's `train_model_simple` does with
    PyTorch DataLoaders under `torch.manual_seed`: the shuffles (each training epoch and
    each evaluation pass over the training set) come from torch's global RNG, AdamW
    decays every parameter (PyTorch's default implementation, not the fused one), and
    there is no extra evaluation after the last step. One process, no torch.compile.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset | None,
        loss_fn: LossFn,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        meta: RunMeta,
        collate_fn: Callable | None = None,
        metrics: dict[str, MetricFn] | None = None,
        progress: bool = False,
        book_exact: bool = False,
    ) -> None:
        self.cfg, self.loss_fn, self.metrics = cfg, loss_fn, metrics or {}
        self.book_exact = book_exact
        self.out_dir, self.meta, self.progress = Path(out_dir), meta, progress
        self.callbacks: dict[str, list[Callback]] = defaultdict(list)
        self.rank, self.world_size = runtime.process_rank()
        self.device = runtime.pick_device(cfg.device)
        self.amp_dtype = runtime.autocast_dtype(cfg.precision, self.device)
        if self.device.type == "cpu":
            runtime.tune_malloc()
        self.model = model.to(self.device)
        self.ddp = runtime.wrap_distributed(self.model, self.device)
        self.train_model = self.ddp or self.model
        if book_exact and (self.world_size > 1 or cfg.compile):
            raise BadInputError("book-exact training runs on one process without torch.compile, as the "
                                "book's code does: leave out --compile and torchrun")
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

        if len(train_data) == 0:
            raise BadInputError("the training set is empty")
        self.collate_fn = collate_fn
        if book_exact:
            self.train_sampler = GlobalSeedBatchSampler(len(train_data), cfg.batch_size, True, True)
        else:
            self.train_sampler = ResumableBatchSampler(len(train_data), cfg.batch_size, True, True,
                                                       cfg.seed, self.rank, self.world_size)
        if len(self.train_sampler) == 0:
            raise BadInputError(f"the training set has {len(train_data)} examples, fewer than one "
                                f"batch of {cfg.batch_size}: lower --batch-size or add data")
        self.train_loader = self._loader(train_data, self.train_sampler)
        # The book evaluates on its shuffled training loader: a new shuffle every evaluation.
        self.train_eval_loader = self._loader(train_data, self._eval_sampler(train_data, shuffle=book_exact))
        self.val_loader = self._loader(val_data, self._eval_sampler(val_data)) if val_data else None

        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        if not decay and not no_decay:
            raise BadInputError("the model has no trainable parameters")
        if book_exact:  # the book's AdamW(model.parameters(), ...): every parameter decays
            self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                               lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        else:
            # Weight decay applies to matrices only, not to biases and LayerNorm gains.
            self.optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay},
                 {"params": no_decay, "weight_decay": 0.0}],
                lr=cfg.lr, betas=cfg.betas, fused=self.device.type in ("cuda", "cpu") or None,
            )
        self.steps_per_epoch = len(self.train_sampler) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise BadInputError("grad_accum is larger than the number of batches in one epoch")
        self.total_steps = self._total_steps(train_data)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.epoch, self.batch_in_epoch, self.tokens_seen = 0, 0, 0, 0
        self.best_val = math.inf
        self.history: list[dict] = []
        self._recent: list[float] = []  # training losses since the last evaluation
        # The last safe point: the phases after it not yet done, the random state and the
        # history length there. A checkpoint always describes such a point.
        self._pending: list[str] = []
        self._safe_rng: dict[str, Any] | None = None
        self._safe_history = 0
        self._stop_requested: str | None = None
        self._last_saved: int | None = None
        self._last_saved_moment: tuple | None = None
        self._updating = False  # inside the optimizer update: no consistent state to save

    def add_callback(self, event: str, fn: Callback) -> None:
        """Call `fn(trainer)` on `event` ("on_eval" or "on_epoch_end"), on rank 0 only."""
        if event not in EVENTS:
            raise BadInputError(f"unknown trainer event {event!r}; choose one of {', '.join(EVENTS)}")
        self.callbacks[event].append(fn)

    def _trigger(self, event: str) -> None:
        if self.rank == 0:
            for fn in self.callbacks[event]:
                fn(self)

    # -- setup -----------------------------------------------------------------------
    def _eval_sampler(self, data: Dataset | None, shuffle: bool = False) -> ResumableBatchSampler | None:
        if data is None or len(data) == 0:
            return None
        if self.book_exact:  # as the book's loaders: the training set's drops its last partial batch
            return GlobalSeedBatchSampler(len(data), self.cfg.batch_size, shuffle, drop_last=shuffle)
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

    @staticmethod
    def _count_tokens(batch: Any) -> int:
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return first.numel() if isinstance(first, torch.Tensor) else len(first)

    def _train_step(self, micro_batches: Sequence[Any]) -> float:
        self.train_model.train()
        total, tokens = 0.0, 0
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            last = i == len(micro_batches) - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext()
            with sync:
                with runtime.autocast(self.device, self.amp_dtype):
                    loss = self.loss_fn(self.train_model, batch) / len(micro_batches)
                loss.backward()
            total += loss.detach().float()
            tokens += self._count_tokens(batch) * self.world_size
        total = float(total)
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"the training loss became {total} at step {self.step + 1}; training stopped and the "
                f"last checkpoint (step {self._last_saved}) in {self.out_dir} is kept: resume from it "
                f"with a lower --lr (now {self.cfg.lr}), warmup (--warmup-steps) or --grad-clip")
        self._updating = True
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += tokens
        self._updating = False
        return total

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
            if self._stop_requested:  # a long evaluation gives way; it is redone on resume
                raise _Stop
            batch = self._to_device(batch)
            with runtime.autocast(self.device, self.amp_dtype):
                sums[0] += float(self.loss_fn(self.model, batch))
            sums[1] += 1
            for j, fn in enumerate(self.metrics.values()):
                value, count = fn(self.model, batch)
                sums[2 + 2 * j] += value
                sums[3 + 2 * j] += count
        runtime.all_reduce_sum(sums)
        out = {"loss": float(sums[0] / max(sums[1], 1))}
        for j, name in enumerate(self.metrics):
            out[name] = float(sums[2 + 2 * j] / max(sums[3 + 2 * j], 1))
        return out

    def _evaluate_and_log(self, recent_losses: list[float], tokens_per_s: float) -> dict:
        n = self.cfg.eval_batches
        train, val = self.evaluate(self.train_eval_loader, n), self.evaluate(self.val_loader, n)
        loss = torch.tensor(sum(recent_losses) / max(1, len(recent_losses)), dtype=torch.float64)
        loss = runtime.all_reduce_sum(loss) / self.world_size  # each process saw its share
        record = {"step": self.step, "epoch": self.epoch + 1, "tokens_seen": self.tokens_seen,
                  "loss": float(loss),
                  "train_loss": train.get("loss"), "val_loss": val.get("loss"),
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s}
        for name in self.metrics:
            record[f"train_{name}"], record[f"val_{name}"] = train.get(name), val.get(name)
        self.history.append(record)
        if self.rank == 0:
            train_state.append_metrics(self.out_dir, record)
        self._trigger("on_eval")
        return record

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resume needs, at the last safe point."""
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": self._safe_rng or train_state.capture_rng(), "pending": list(self._pending),
                 "recent_losses": list(self._recent), "history": self.history[:self._safe_history],
                 "config": asdict(self.cfg)}
        if self.book_exact:  # the shuffle of the epoch under way, drawn when it began
            state["book_pass_seed"] = self.train_sampler.pass_seed
        return state

    def save_checkpoint(self, periodic: bool = False) -> None:
        """Write a complete checkpoint of the run as it stands (rank 0 only) and make it current.

        The last `keep_last` checkpoints stay (at least one). A periodic checkpoint whose
        validation loss is the lowest so far is also kept in best/.
        """
        if self.rank != 0:
            return
        moment = (self.step, self._safe_history, tuple(self._pending))
        if moment == self._last_saved_moment:
            return  # this moment is the current checkpoint already
        self._ensure_base()
        val = self.history[-1].get("val_loss") if (periodic and self.history) else None
        if val is not None and val < self.best_val:
            self.best_val = val
            train_state.save_best(self.out_dir, self.model, self.meta, self.step, val)
        train_state.save_checkpoint(self.out_dir, self.model, self.meta, self.state_dict(), self.cfg.keep_last)
        self._last_saved, self._last_saved_moment = self.step, moment
        log.info("checkpoint of step %d saved in %s", self.step, self.out_dir)

    def _ensure_base(self) -> None:
        """A LoRA run on a model that cannot be loaded again (a fresh one) keeps one frozen
        copy of it in base/, which every checkpoint's adapters refer to."""
        base = self.meta.base_model
        if has_lora(self.model) and (not base or base.startswith("init:")):
            save_model(without_lora(self.model), self.out_dir / BASE_DIR,
                       RunMeta(model=self.model.cfg, base_model=base))
            self.meta = self.meta.replace(base_model=BASE_DIR)

    def resume(self, run_dir: str | os.PathLike | None = None) -> None:
        """Restore optimizer, schedule, RNG, data position and unfinished work of the run's
        current checkpoint.

        The model weights must already be the same checkpoint's (`gptforge.load(run_dir,
        for_training=True)`); this restores everything else, so training continues as
        if it had never stopped. metrics.jsonl is rewritten to the checkpoint's history.
        """
        run = Path(run_dir or self.out_dir)
        state, folder = train_state.load_training_state(run)
        if self.book_exact != ("book_pass_seed" in state):
            how = "with" if "book_pass_seed" in state else "without"
            raise BadInputError(f"{run} was trained {how} book-exact random draws; resume it {how} them "
                                f"(--book-exact, pretrain(..., book_exact=...)), or it would not continue "
                                f"the same run")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.tokens_seen = state["batch_in_epoch"], state["tokens_seen"]
        self.best_val, self.history = state["best_val"], state["history"]
        self._pending, self._recent = list(state.get("pending", [])), list(state.get("recent_losses", []))
        train_state.restore_rng(state["rng"])
        if self.book_exact:
            self.train_sampler.pass_seed = state["book_pass_seed"]
        self._safe_rng, self._safe_history, self._last_saved = state["rng"], len(self.history), self.step
        self.meta = self.meta.replace(base_model=RunMeta.read(run).base_model or self.meta.base_model)
        if self.rank == 0:
            train_state.write_metrics(self.out_dir, self.history)
        log.info("resuming from the checkpoint of step %d in %s", self.step, folder)

    # -- interruptions ---------------------------------------------------------------
    @contextlib.contextmanager
    def _deferred_signals(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop at its next safe point, where it
        saves a checkpoint it can resume from exactly; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(signum, frame) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = signal.Signals(signum).name
            log.warning("%s: stopping at the next safe point (again to stop at once)", self._stop_requested)

        previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _safe_point(self, pending: Sequence[str] = ()) -> None:
        """Everything up to here is done and the phases in `pending` are not: remember the
        random state for a checkpoint of this moment, and stop here if asked to."""
        self._pending, self._safe_rng = list(pending), train_state.capture_rng()
        self._safe_history = len(self.history)
        stop = torch.tensor(1.0 if self._stop_requested else 0.0)
        if runtime.all_reduce_sum(stop) > 0:  # every process stops at the same point
            raise _Stop

    def _run_phases(self, phases: list[str], tokens_per_s: float = 0.0) -> None:
        """The work that follows an optimizer step, in order: "eval", "save", "epoch_end"."""
        for i, phase in enumerate(phases):
            self._safe_point(phases[i:])
            if phase == "eval":
                faults.reach("eval")
                self._evaluate_and_log(self._recent, tokens_per_s)
                self._recent = []
            elif phase == "save":
                self._pending = phases[i + 1:]  # the checkpoint is of the moment after this phase
                self.save_checkpoint(periodic=True)
            elif phase == "epoch_end":
                faults.reach("epoch_end")
                self._trigger("on_epoch_end")
        self._safe_point()

    # -- the loop --------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until the budget (epochs, steps or tokens) is spent; return the history.

        Interrupted by a signal, it saves a checkpoint of the last safe point and
        raises KeyboardInterrupt; `stop_after` pauses the same way but returns.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        if self.rank == 0:
            atomic_write_json(self.out_dir / train_state.TRAIN_CONFIG_NAME, asdict(cfg))
            if not (self.out_dir / META_NAME).is_file():  # what the run is, before any checkpoint
                self.meta.replace(checkpoint=None).write(self.out_dir)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        t_last, tokens_last = time.perf_counter(), self.tokens_seen
        paused = False
        with self._deferred_signals():
            try:
                if self.step == 0 and not self.history:
                    self._safe_point()
                    self.save_checkpoint()  # a run killed before its first save starts over from here
                self._run_phases(self._pending)  # work an interruption left undone
                while self.step < self.total_steps and not paused:
                    self.train_sampler.epoch = self.epoch
                    self.train_sampler.start_batch = self.batch_in_epoch
                    micro: list[Any] = []
                    for batch in self.train_loader:
                        micro.append(batch)
                        if len(micro) < cfg.grad_accum:
                            continue
                        self._recent.append(self._train_step(micro))
                        micro = []
                        self.step += 1
                        self.batch_in_epoch += cfg.grad_accum
                        faults.reach("step")
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{self._recent[-1]:.3f}", epoch=self.epoch + 1)
                        phases = []
                        last = self.step == self.total_steps and not self.book_exact
                        if (self.step - 1) % cfg.eval_every == 0 or last:
                            phases.append("eval")
                        if cfg.save_every and self.step % cfg.save_every == 0:
                            phases.append("save")
                        now = time.perf_counter()
                        rate = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                        self._run_phases(phases, rate)
                        if "eval" in phases:
                            t_last, tokens_last = time.perf_counter(), self.tokens_seen
                        paused = self.step == cfg.stop_after and self.step < self.total_steps
                        if self.step >= self.total_steps or paused:
                            break
                    if self.batch_in_epoch + cfg.grad_accum > len(self.train_sampler):
                        # The epoch ran out of batches (a partial accumulation is dropped).
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        self._run_phases(["epoch_end"])
            except _Stop:
                self.save_checkpoint()
                raise KeyboardInterrupt from None
            except KeyboardInterrupt:  # a second Ctrl-C, or one raised by a callback
                if self._safe_rng is not None and not self._updating:
                    self.save_checkpoint()  # the state of the last safe point, which is whole
                else:
                    log.warning("interrupted while the weights were being updated: the run resumes "
                                "from its last checkpoint")
                raise
            finally:
                if bar is not None:
                    bar.close()
            self.save_checkpoint()
        if self.rank == 0:
            self.plot()
        runtime.finish_distributed()
        return TrainResult(self.step, self.tokens_seen, self.history, paused)

    def plot(self) -> Path | None:
        """Write loss.png (and one PNG per metric) from the history; needs matplotlib."""
        if not self.history:
            return None
        from gptforge.plotting import plot_history

        return plot_history(self.history, self.out_dir, list(self.metrics))


class _Stop(Exception):
    """Raised at a safe point once a stop was asked for (Ctrl-C, SIGTERM)."""


class TrainingDiverged(GptforgeError, RuntimeError):
    """The loss became NaN or infinite; the run's last checkpoint is kept."""
