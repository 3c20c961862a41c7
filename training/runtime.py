"""The training loop every trainer kind shares: one process or many (torchrun / DDP), atomic
checkpoints with exact resume, interruption that never loses work, and what a user watches
(progress bar, log file, metrics, loss curve).

A trainer kind is a ``TrainingTask``: it owns data, models, objective, optimiser and export; this
module owns the order of samples, the step loop and everything that must survive a crash.

Exact resume: the sample order is a pure function of (seed, epoch), the checkpoint records the
position in it, and every rank's RNG states, the optimiser and the scheduler are restored, so a run
killed at any step and resumed ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors import SafetensorError, safe_open
from torch import nn

from ..weights import save_safetensors_atomic, write_atomic
from .config import ConfigError

log = logging.getLogger("x2i.training")

CHECKPOINT_FORMAT = "x2i.training-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
# Settings that may change between a run and its resumption; every other one must match.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "validate_every", "log_every",
     "num_workers", "device", "compile", "backend", "distributed_timeout_minutes"}
)


class TrainingError(RuntimeError):
    """A run that cannot start or continue, with what to do about it."""


def write_error_text(exc: OSError) -> str:
    """``cannot write <path> (<why>)`` for an ``OSError`` raised while writing (``weights.write_atomic``'s
    already reads so; a plain one names its file and the system's reason)."""
    text = str(exc)
    if text.startswith("cannot write"):
        return text
    if exc.filename is not None:
        return f"cannot write {exc.filename} ({exc.strerror or text})"
    return f"cannot write ({text})"


@contextlib.contextmanager
def _writing(what: str, fix: str = "free disk space (or point run.output_dir elsewhere) and run the same command again"):
    """An ``OSError`` (full disk, permissions, quota) while writing ``what`` becomes a :class:`TrainingError`
    naming it, which the command line prints as one ``error:`` line. The checkpoints written before stay
    intact: each is written atomically."""
    try:
        yield
    except OSError as exc:
        raise TrainingError(f"{what}: {write_error_text(exc)}; {fix}") from exc


@dataclasses.dataclass
class RunSettings:
    """The ``[run]`` section: how long, how big, where to, and how often to save."""

    output_dir: str
    seed: int = 0
    epochs: int = 1
    # 0: the epochs decide; otherwise training stops after this many optimiser steps.
    max_steps: int = 0
    # Global batch: split evenly across processes, so results do not depend on the process count.
    batch_size: int = 32
    num_workers: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # 0: validate at the end of every epoch.
    validate_every: int = 0
    log_every: int = 10
    # auto: bf16 autocast on CUDA, fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    device: str = "auto"
    # 0: no gradient clipping.
    grad_clip: float = 0.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # How long processes wait for each other (cache building happens between barriers).
    distributed_timeout_minutes: int = 360

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "distributed_timeout_minutes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "num_workers", "validate_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must not be negative, got {self.grad_clip}")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir must name a folder")


class Distributed:
    """This process's place in the run: rank, world size and device (torchrun's env vars, or one process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    @classmethod
    def from_environment(cls, device: str = "auto", backend: str = "auto", timeout_minutes: int = 360) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        resolved = torch.device(device)
        if resolved.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainingError("run.device asks for CUDA but torch sees no CUDA device; set run.device = \"cpu\"")
            if resolved.index is None:
                resolved = torch.device("cuda", local_rank)
            torch.cuda.set_device(resolved)
        if world_size > 1 and not torch_dist.is_initialized():
            chosen = backend if backend != "auto" else ("nccl" if resolved.type == "cuda" else "gloo")
            # Generous: ranks wait at a barrier while rank 0 (or each rank) builds feature/latent caches.
            torch_dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
        return cls(rank, world_size, local_rank, resolved)

    def barrier(self) -> None:
        if self.initialized:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; differentiable (gradients flow back to every rank's contribution)."""
        if not self.initialized:
            return tensor
        return torch_dist.nn.functional.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor) / self.world_size if self.initialized else tensor

    def any(self, flag: bool) -> bool:
        if not self.initialized:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device if torch_dist.get_backend() == "nccl" else "cpu")
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.initialized:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        if not self.initialized:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.initialized:
            torch_dist.destroy_process_group()


class TrainingTask(abc.ABC):
    """What a trainer kind provides to the shared loop (see training/README-style docstrings of each kind)."""

    kind: str = ""
    # Defaults this kind applies to [run] under the user's own values (e.g. the official grad clip).
    RUN_DEFAULTS: Mapping[str, Any] = {}

    @classmethod
    def run_defaults(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """[run] defaults for this config (a kind may vary them, e.g. by modality)."""
        return dict(cls.RUN_DEFAULTS)

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The task's resolved config: saved in checkpoints and outputs, compared on resume."""

    @abc.abstractmethod
    def prepare(self, dist: Distributed, log: logging.Logger, *, dry_run: bool = False) -> None:
        """Read and check the data, load frozen encoders, build caches (dry_run: check and count only)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, int | str]:
        """Counts for --dry-run and the log: samples found, skipped by reason, cache state."""

    @abc.abstractmethod
    def train_dataset(self) -> torch.utils.data.Dataset:
        """Map-style dataset; if it has ``set_epoch(epoch)`` the loop calls it at each epoch start."""

    def collate(self, samples: list[Any]) -> Any:
        return torch.utils.data.default_collate(samples)

    @abc.abstractmethod
    def build_model(self, dist: Distributed) -> nn.Module:
        """A module whose ``forward(batch)`` returns ``{"loss": …, other terms…}`` (means over the local batch)."""

    @abc.abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer: ...

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        return None

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics, on rank 0 only (so no collectives here), model in eval mode under no_grad."""
        return {}

    @abc.abstractmethod
    def export(self, model: nn.Module, output_dir: Path) -> list[Path]:
        """Write the files the pack's nodes load; return their paths."""


@dataclasses.dataclass
class TrainResult:
    step: int
    epoch: int
    exported: list[Path]
    interrupted: bool
    metrics: dict[str, float]
    dry_run: dict[str, int | str] | None = None


# --- sample order -----------------------------------------------------------------------------------


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


# --- checkpoints ------------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: what a checkpoint must hold (frozen weights come from their files)."""
    # remove_duplicate=False: a tied weight (T5's embed_tokens = shared) is frozen under every name.
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def _rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    plain = {"python": random.getstate(), "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def _set_rng_state(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    version, state, *rest = plain["python"]
    random.setstate((version, tuple(state), *rest))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def seed_everything(seed: int, rank: int) -> None:
    # Each rank draws different noise (timesteps, dropout), reproducibly.
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                plain_state.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": plain_state}


def _optimizer_state(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in plain["state"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": plain["param_groups"]}


@dataclasses.dataclass
class Position:
    """Where the run stands: optimiser steps taken, and the next batch of which epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def checkpoint_files(output_dir: Path) -> list[Path]:
    folder = output_dir / CHECKPOINT_DIR
    return sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: Position,
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    identity: Mapping[str, Any],
) -> None:
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    optimizer_tensors, optimizer_plain = _optimizer_tensors(optimizer)
    tensors.update(optimizer_tensors)
    rng_plain = []
    for rank, (rank_tensors, plain) in enumerate(rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rank_tensors.items()})
        rng_plain.append(plain)
    header = {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "position": dataclasses.asdict(position),
        "optimizer": optimizer_plain,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_plain,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        save_safetensors_atomic(tensors, path, {"x2i.checkpoint": json.dumps(header)})
    except (OSError, SafetensorError) as exc:
        previous = [p.name for p in checkpoint_files(path.parents[1]) if p != path]
        raise TrainingError(
            f"could not write checkpoint {path} ({getattr(exc, 'strerror', None) or exc}); nothing was overwritten"
            + (f", the last good checkpoint is {previous[-1]}" if previous else "")
            + ". Free disk space (or point run.output_dir elsewhere) and resume."
        ) from exc


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "x2i.checkpoint" not in metadata:
                raise TrainingError(f"{path} is not a training checkpoint of this pack (no x2i.checkpoint metadata)")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, SafetensorError) as exc:
        # safetensors raises on truncated headers; an atomic writer never leaves one, but a copy might.
        raise TrainingError(f"cannot read checkpoint {path}: {exc}") from exc
    header = json.loads(metadata["x2i.checkpoint"])
    if header.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} has checkpoint format {header.get('format')!r}; this version reads {CHECKPOINT_FORMAT}")
    return tensors, header


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += _differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return found
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint {saved!r}, now {current!r}"]


def run_identity(task: TrainingTask, settings: RunSettings, world_size: int) -> dict[str, Any]:
    run = {k: v for k, v in dataclasses.asdict(settings).items() if k not in RESUMABLE_CHANGES}
    return {"kind": task.kind, "task": json.loads(json.dumps(task.config(), default=str)), "run": run, "world_size": world_size}


def _ignore_sigint_in_worker(worker_id: int) -> None:
    # Ctrl+C reaches the whole process group; loader workers must outlive it until the loop has
    # checkpointed, and the main process shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- what the user watches --------------------------------------------------------------------------


def _attach_log_file(output_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(output_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("x2i")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """loss_curve.png from metrics.jsonl: every logged term against the step, validation on the right axis."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    train: dict[str, list[tuple[int, float]]] = {}
    val: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        bucket = val if record.get("split") == "val" else train
        for key, value in record.items():
            if key not in ("step", "epoch", "split", "lr", "samples_per_s") and isinstance(value, (int, float)):
                bucket.setdefault(key, []).append((record["step"], value))
    if not train:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, points in sorted(train.items()):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=key, linewidth=1.5 if key == "loss" else 0.8)
    if all(v > 0 for points in train.values() for _, v in points):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss terms")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if val:
        right = ax.twinx()
        for key, points in sorted(val.items()):
            steps, values = zip(*points, strict=True)
            right.plot(steps, values, "o--", markersize=3, label=f"val {key}")
        right.set_ylabel("validation")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    fig.tight_layout()
    try:
        write_atomic(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


class _StopRequests:
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

    def __enter__(self) -> _StopRequests:
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _autocast(settings: RunSettings, device: torch.device):
    use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _scalar(value: torch.Tensor | float) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


# --- the loop ---------------------------------------------------------------------------------------


def _resume_source(output_dir: Path, resume: str) -> Path | None:
    existing = checkpoint_files(output_dir)
    if resume == "never":
        if existing:
            raise TrainingError(
                f"{output_dir} already holds checkpoints of a run ({existing[-1].name}); resume it with --resume auto, "
                "or choose another run.output_dir"
            )
        return None
    if resume == "auto":
        return existing[-1] if existing else None
    path = Path(resume)
    if not path.is_file():
        raise TrainingError(f"--resume {resume}: no such checkpoint file")
    return path


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
    handler = None
    try:
        if dry_run:
            task.prepare(dist, log, dry_run=True)
            return TrainResult(0, 0, [], False, {}, dry_run=task.describe())
        if settings.batch_size % dist.world_size:
            raise TrainingError(
                f"run.batch_size {settings.batch_size} does not split evenly over {dist.world_size} processes; "
                "use a multiple of the process count"
            )
        with _writing("run.output_dir"):
            output_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if dist.is_main:
            with _writing("the run's log"):
                handler = _attach_log_file(output_dir)
        return _train(task, settings, dist, output_dir, resume)
    finally:
        if handler is not None:
            logging.getLogger("x2i").removeHandler(handler)
            handler.close()
        if own_dist:
            dist.close()


def _train(task: TrainingTask, settings: RunSettings, dist: Distributed, output_dir: Path, resume: str) -> TrainResult:
    identity = run_identity(task, settings, dist.world_size)
    source = _resume_source(output_dir, resume)
    saved_tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] | None = None
    if source is not None:
        saved_tensors, header = read_checkpoint(source)
        differences = _differences(header["identity"]["kind"], identity["kind"], "kind.") + _differences(
            header["identity"]["task"], identity["task"], "") + _differences(header["identity"]["run"], identity["run"], "run.")
        if differences:
            raise ConfigError(
                f"the config disagrees with checkpoint {source}: " + "; ".join(differences[:8])
                + ". Resume with the original settings, or start a new run in another run.output_dir"
            )
    seed_everything(settings.seed, dist.rank)
    task.prepare(dist, log)
    # Again: whether prepare() ran encoders (cache built) or not (cache reused) must not change the
    # initial weights.
    seed_everything(settings.seed, dist.rank)
    if dist.is_main:
        log.info("data: %s", json.dumps(task.describe(), default=str))
    dataset = task.train_dataset()
    steps_per_epoch = len(dataset) // settings.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(
            f"the training set has {len(dataset)} samples, fewer than one batch of run.batch_size = {settings.batch_size}; "
            "add data or lower the batch size"
        )
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch

    model = task.build_model(dist).to(dist.device)
    optimizer = task.build_optimizer(model)
    scheduler = task.build_scheduler(optimizer, steps_per_epoch, total_steps)
    position = Position()
    if header is not None:
        _restore(model, optimizer, scheduler, saved_tensors, header, dist)
        position = Position(**header["position"])
        if dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", source, position.step, position.epoch, position.step_in_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(f"the {task.kind} model has no trainable parameters")

    runner: nn.Module = model
    if dist.world_size > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if settings.compile:
        runner = torch.compile(runner)

    metrics_path = output_dir / "metrics.jsonl"
    last_metrics: dict[str, float] = {}
    exported: list[Path] = []

    def record(entry: dict[str, Any]) -> None:
        if dist.is_main:
            # An append-only log: a torn last line costs one record, never an earlier one.
            with _writing("the metrics log"), metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def checkpoint() -> None:
        rng = dist.gather_objects(_rng_state(dist.device))
        if dist.is_main:
            path = output_dir / CHECKPOINT_DIR / f"step-{position.step:08d}.safetensors"
            save_checkpoint(path, model, optimizer, scheduler, position, rng, identity)
            with _writing("removing old checkpoints", f"{path.name} is written; fix the folder's permissions and run the "
                          "same command again"):
                for old in checkpoint_files(output_dir)[: -settings.keep_checkpoints]:
                    old.unlink(missing_ok=True)
            if metrics_path.exists():
                with _writing("the loss curve", f"{path.name} is written; free disk space and run the same command again"):
                    plot_loss_curve(metrics_path, output_dir / "loss_curve.png")
            log.info("checkpoint %s", path.name)
        dist.barrier()

    def validate() -> None:
        nonlocal last_metrics
        if dist.is_main:
            model.eval()
            with torch.no_grad(), _autocast(settings, dist.device):
                values = {k: _scalar(v) for k, v in task.validate(model).items()}
            model.train()
            if values:
                last_metrics = values
                record({"step": position.step, "epoch": position.epoch, "split": "val", **values})
                log.info("validation at step %d: %s", position.step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        dist.barrier()

    progress = None
    if dist.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=position.step, desc=f"train {task.kind}", unit="step", dynamic_ncols=True)
    interrupted = False
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    with _StopRequests() as stop:
        while position.step < total_steps and not interrupted:
            dataset_epoch = getattr(dataset, "set_epoch", None)
            if dataset_epoch is not None:
                dataset_epoch(position.epoch)
            sampler = GlobalBatchSampler(
                len(dataset), settings.batch_size, settings.seed, position.epoch, position.step_in_epoch, dist.rank, dist.world_size
            )
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, collate_fn=task.collate, num_workers=settings.num_workers,
                pin_memory=dist.device.type == "cuda", persistent_workers=False,
                worker_init_fn=_ignore_sigint_in_worker if settings.num_workers else None,
                # Its own generator: a loader otherwise draws its worker seed from the global RNG, which a
                # resumed run would then advance at a different step than the uninterrupted one.
                generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + position.epoch),
            )
            for batch in loader:
                with _autocast(settings, dist.device):
                    terms = runner(to_device(batch, dist.device))
                loss = terms["loss"]
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {position.step + 1}; the last checkpoint is intact. "
                        "Lower the learning rate or use precision = \"fp32\", then resume"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                position.step += 1
                position.step_in_epoch += 1
                window_samples += settings.batch_size
                if position.step % settings.log_every == 0 or position.step == total_steps:
                    values = {k: dist.all_reduce_mean(v.detach().float()).item() for k, v in terms.items()}
                    elapsed = time.perf_counter() - window_start
                    rate = window_samples / elapsed if elapsed > 0 else math.nan
                    lr = optimizer.param_groups[0]["lr"]
                    record({"step": position.step, "epoch": position.epoch, "split": "train", "lr": lr, "samples_per_s": rate, **values})
                    if progress is not None:
                        progress.set_postfix(loss=f"{values['loss']:.4g}", samples_s=f"{rate:.0f}", refresh=False)
                        log.debug("step %d loss %.6g lr %.3g %.1f samples/s", position.step, values["loss"], lr, rate)
                    window_start, window_samples = time.perf_counter(), 0
                if progress is not None:
                    progress.update(1)
                epoch_done = position.step_in_epoch == steps_per_epoch
                if epoch_done:
                    position.epoch += 1
                    position.step_in_epoch = 0
                if (settings.validate_every and position.step % settings.validate_every == 0) or (
                    not settings.validate_every and epoch_done
                ):
                    validate()
                if dist.any(stop.requested):
                    interrupted = position.step < total_steps
                    if dist.is_main and interrupted:
                        log.warning("stopping at step %d on request; resume with the same command", position.step)
                    break
                if position.step % settings.checkpoint_every == 0 and position.step < total_steps:
                    checkpoint()
                if position.step >= total_steps:
                    break
    if progress is not None:
        progress.close()
    checkpoint()
    if dist.is_main:
        with _writing(f"exporting the trained {task.kind}", "the last checkpoint holds the weights: free disk space and "
                      "run the same command again to export them"):
            exported = task.export(model, output_dir)
        log.info("%s: wrote %s", "interrupted" if interrupted else "finished", ", ".join(str(p) for p in exported))
    dist.barrier()
    return TrainResult(position.step, position.epoch, exported, interrupted, last_metrics)


def _restore(model: nn.Module, optimizer, scheduler, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any], dist: Distributed) -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise TrainingError(
            f"the checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {wrong[:3]}; it belongs to another configuration"
        )
    model.load_state_dict(state, strict=False)
    optimizer.load_state_dict(_optimizer_state(tensors, header["optimizer"]))
    if scheduler is not None and header.get("scheduler") is not None:
        scheduler.load_state_dict(header["scheduler"])
    if len(header["rng"]) != dist.world_size:
        # The math of a global batch does not depend on the process count, but the noise each rank
        # draws does: continue correctly, not bit-identically.
        position = header["position"]["step"]
        seed_everything(header["identity"]["run"]["seed"] + 7919 * position, dist.rank)
        if dist.is_main:
            log.warning(
                "the checkpoint was written by %d processes and this run has %d: training continues with fresh random "
                "streams, so it will not repeat an uninterrupted run bit for bit", len(header["rng"]), dist.world_size,
            )
        return
    rank_tensors = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{dist.rank}.")}
    _set_rng_state(rank_tensors, header["rng"][dist.rank], dist.device)


def apply_run_defaults(raw_run: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The user's [run] values over a task's own defaults."""
    return {**defaults, **raw_run}
