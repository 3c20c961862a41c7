"""The training loop every trainer kind shares: one process or many (torchrun / DDP), exact resume,
interruption that never loses work.

A trainer kind is a :class:`.task.TrainingTask`: it owns data, models, objective, optimiser and export; the
loop owns the order of samples and the steps, and hands the task its own model, never a wrapper.
Checkpoints are :mod:`.checkpoints`, what the user watches :mod:`.reporting`.

The sample order is a pure function of (seed, epoch) (:class:`GlobalBatchSampler`), so a resumed run sees
the batches an uninterrupted one sees, from the position the checkpoint recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import Position, TrainState, load_resume, restore, run_identity, seed_everything, write_checkpoint
from .distributed import Distributed
from .errors import TrainingError, writing
from .reporting import RunReport, attach_log_file, detach_log_file
from .settings import RunSettings
from .task import TrainingTask

log = logging.getLogger("x2i.training")


@dataclasses.dataclass
class TrainResult:
    step: int
    epoch: int
    exported: list[Path]
    interrupted: bool
    metrics: dict[str, float]
    dry_run: dict[str, int | str] | None = None


def train(
    task: TrainingTask,
    settings: RunSettings,
    *,
    resume: str = "auto",
    dry_run: bool = False,
    dist: Distributed | None = None,
) -> TrainResult:
    """Run (or continue) a training run to the end or to an interruption; see the module docstring."""
    own_dist = dist is None
    dist = dist or Distributed.from_environment(settings.device, settings.backend, settings.distributed_timeout_minutes)
    output_dir = Path(settings.output_dir)
    log_file = None
    try:
        if dry_run:
            task.prepare(dist, log, dry_run=True)
            return TrainResult(0, 0, [], False, {}, dry_run=task.describe())
        if settings.batch_size % dist.world_size:
            raise TrainingError(
                f"run.batch_size {settings.batch_size} does not split evenly over {dist.world_size} processes; "
                "use a multiple of the process count"
            )
        with writing("run.output_dir"):
            output_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if dist.is_main:
            with writing("the run's log"):
                log_file = attach_log_file(output_dir)
        return _train(task, settings, dist, output_dir, resume)
    finally:
        if log_file is not None:
            detach_log_file(log_file)
        if own_dist:
            dist.close()


def _train(task: TrainingTask, settings: RunSettings, dist: Distributed, output_dir: Path, resume: str) -> TrainResult:
    identity = run_identity(task, settings, dist.world_size)
    saved = load_resume(output_dir, resume, identity, task.RENAMED)
    seed_everything(settings.seed, dist.rank)
    task.prepare(dist, log)
    # Again: whether prepare() ran encoders (cache built) or not (cache reused) must not change the initial weights.
    seed_everything(settings.seed, dist.rank)
    if dist.is_main:
        log.info("data: %s", json.dumps(task.describe(), default=str))
    dataset = task.train_dataset()
    steps_per_epoch, total_steps = _run_length(len(dataset), settings)

    model = task.build_model(dist).to(dist.device)
    optimizer = task.build_optimizer(model)
    state = TrainState(model, optimizer, task.build_scheduler(optimizer, steps_per_epoch, total_steps))
    if saved is not None:
        restore(saved, state, dist)
    position = state.position
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(f"the {task.kind} model has no trainable parameters")
    runner = _wrap(model, settings, dist)  # what each step calls; the task only ever sees `model`

    report = RunReport(output_dir, dist, task.kind, total_steps, position.step, settings.batch_size)
    last_metrics: dict[str, float] = {}
    interrupted = False
    model.train()
    with StopRequests() as stop:
        while position.step < total_steps and not interrupted:
            for batch in _epoch_batches(dataset, task.collate, settings, dist, position):
                terms = _step(runner, batch, state, trainable, settings, dist.device)
                position.step += 1
                position.step_in_epoch += 1
                report.training_step(position.step, position.epoch, terms, optimizer,
                                     due=position.step % settings.log_every == 0 or position.step == total_steps)
                epoch_done = position.step_in_epoch == steps_per_epoch
                if epoch_done:
                    position.epoch, position.step_in_epoch = position.epoch + 1, 0
                if (settings.validate_every and position.step % settings.validate_every == 0) or (
                    not settings.validate_every and epoch_done
                ):
                    last_metrics = _validate(task, model, settings, dist, report, position) or last_metrics
                if dist.any(stop.requested):
                    interrupted = position.step < total_steps
                    if dist.is_main and interrupted:
                        log.warning("stopping at step %d on request; resume with the same command", position.step)
                    break
                if position.step % settings.checkpoint_every == 0 and position.step < total_steps:
                    _checkpoint(output_dir, state, identity, settings, dist, report)
                if position.step >= total_steps:
                    break
    report.close()
    _checkpoint(output_dir, state, identity, settings, dist, report)
    exported = _export(task, model, output_dir, dist, interrupted)
    return TrainResult(position.step, position.epoch, exported, interrupted, last_metrics)


# --- the loop's steps, in the order they run ------------------------------------------------------------


def _run_length(num_samples: int, settings: RunSettings) -> tuple[int, int]:
    """(steps per epoch, total steps): only whole global batches are trained."""
    steps_per_epoch = num_samples // settings.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(
            f"the training set has {num_samples} samples, fewer than one batch of run.batch_size = {settings.batch_size}; "
            "add data or lower the batch size"
        )
    return steps_per_epoch, settings.max_steps or settings.epochs * steps_per_epoch


def _wrap(model: nn.Module, settings: RunSettings, dist: Distributed) -> nn.Module:
    """The model as the steps call it: under DDP when there are several processes, compiled when asked."""
    runner: nn.Module = model
    if dist.world_size > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if settings.compile:
        runner = torch.compile(runner)
    return runner


def _epoch_batches(dataset: torch.utils.data.Dataset, collate: Callable, settings: RunSettings, dist: Distributed,
                   position: Position) -> torch.utils.data.DataLoader:
    """This process's batches of the epoch the run stands in, from the batch it stands at."""
    set_epoch = getattr(dataset, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(position.epoch)
    sampler = GlobalBatchSampler(
        len(dataset), settings.batch_size, settings.seed, position.epoch, position.step_in_epoch, dist.rank, dist.world_size
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=settings.num_workers,
        pin_memory=dist.device.type == "cuda", persistent_workers=False,
        worker_init_fn=_ignore_sigint_in_worker if settings.num_workers else None,
        # Its own generator: a loader otherwise draws its worker seed from the global RNG, which a
        # resumed run would then advance at a different step than the uninterrupted one.
        generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + position.epoch),
    )


def _step(runner: nn.Module, batch: Any, state: TrainState, trainable: list[nn.Parameter], settings: RunSettings,
          device: torch.device) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch; the loss terms (this process's means)."""
    with _autocast(settings, device):
        terms = runner(to_device(batch, device))
    loss = terms["loss"]
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"the loss became {loss.item()} at step {state.position.step + 1}; the last checkpoint is intact. "
            "Lower the learning rate or use precision = \"fp32\", then resume"
        )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
    state.optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()
    return terms


def _validate(task: TrainingTask, model: nn.Module, settings: RunSettings, dist: Distributed, report: RunReport,
              position: Position) -> dict[str, float]:
    """The task's held-out metrics, computed and recorded by rank 0 while the others wait."""
    values: dict[str, float] = {}
    if dist.is_main:
        model.eval()
        with torch.no_grad(), _autocast(settings, dist.device):
            values = {k: _scalar(v) for k, v in task.validate(model).items()}
        model.train()
        if values:
            report.validation(position.step, position.epoch, values)
    dist.barrier()
    return values


def _checkpoint(output_dir: Path, state: TrainState, identity: Mapping[str, Any], settings: RunSettings, dist: Distributed,
                report: RunReport) -> None:
    path = write_checkpoint(output_dir, state, identity, settings.keep_checkpoints, dist)
    if path is not None:
        report.draw_loss_curve(path)
        log.info("checkpoint %s", path.name)
    dist.barrier()


def _export(task: TrainingTask, model: nn.Module, output_dir: Path, dist: Distributed, interrupted: bool) -> list[Path]:
    exported: list[Path] = []
    if dist.is_main:
        with writing(f"exporting the trained {task.kind}", "the last checkpoint holds the weights: free disk space and "
                     "run the same command again to export them"):
            exported = task.export(model, output_dir)
        log.info("%s: wrote %s", "interrupted" if interrupted else "finished", ", ".join(str(p) for p in exported))
    dist.barrier()
    return exported


def _autocast(settings: RunSettings, device: torch.device):
    use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _scalar(value: torch.Tensor | float) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


# --- sample order -----------------------------------------------------------------------------------------


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's slice of each global batch of one epoch, from ``start_step`` on (the last partial
    global batch is dropped so every step sees ``batch_size`` samples)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, start_step: int, rank: int, world_size: int) -> None:
        self.order = epoch_permutation(num_samples, seed, epoch)
        self.batch_size = batch_size
        self.local = batch_size // world_size
        self.rank = rank
        self.start_step = start_step
        self.steps = num_samples // batch_size

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            first = step * self.batch_size + self.rank * self.local
            yield self.order[first: first + self.local].tolist()


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(to_device(v, device) for v in batch) if not hasattr(batch, "_fields") else type(batch)(*(to_device(v, device) for v in batch))
    return batch


def _ignore_sigint_in_worker(worker_id: int) -> None:
    # Ctrl+C reaches the whole process group; loader workers must outlive it until the loop has
    # checkpointed, and the main process shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequests:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop after the current step; a second SIGINT
    interrupts at once (the last checkpoint stays intact)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step (press Ctrl+C again to abort at once)", self.signal_name)

    def __enter__(self) -> StopRequests:
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
