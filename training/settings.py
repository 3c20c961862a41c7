"""Settings as the trainer reads them: the one field helper every config section is written with (its help
text is what ``train <kind> --help`` prints), and the ``[run]`` section every kind shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal


def setting(default: Any = dataclasses.MISSING, doc: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A config dataclass field with the one-line meaning ``train <kind> --help`` prints next to it.
    Neither ``default`` nor ``factory``: the key is required."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": doc})
    return dataclasses.field(default=default, metadata={"help": doc})


def check_file_name(name: str) -> None:
    """A name the run writes ``<run.output_dir>/<name>...`` under: a plain file name, not a path."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name must be a plain file name, got {name!r}")


@dataclasses.dataclass
class RunSettings:
    """The ``[run]`` section: how long, how big, where to, and how often to save."""

    output_dir: str = setting(doc="the run's folder: checkpoints, train.log, metrics.jsonl, loss_curve.png and the exported model")
    seed: int = setting(0, "seeds the weights, the sample order and every random draw (each process its own stream)")
    epochs: int = setting(1, "passes over the training set (max_steps, when set, decides instead)")
    max_steps: int = setting(0, "0: the epochs decide; otherwise training stops after this many optimiser steps")
    batch_size: int = setting(32, "global batch: split evenly over the processes, so results do not depend on their count")
    num_workers: int = setting(0, "DataLoader worker processes per training process (0: load in the training process)")
    checkpoint_every: int = setting(500, "write a checkpoint every this many steps (and always at the end and on Ctrl+C)")
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints stay in <output_dir>/checkpoints")
    validate_every: int = setting(0, "validate every this many steps; 0: at the end of every epoch")
    log_every: int = setting(10, "write the loss terms to metrics.jsonl and the progress bar every this many steps")
    precision: Literal["auto", "bf16", "fp32"] = setting("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere")
    compile: bool = setting(False, "run the model through torch.compile")
    device: str = setting("auto", "auto: CUDA (this process's GPU under torchrun) when there is one, else the CPU")
    grad_clip: float = setting(0.0, "clip the gradients' global norm to this; 0: no clipping")
    backend: Literal["auto", "nccl", "gloo"] = setting("auto", "torch.distributed backend; auto: nccl on GPUs, gloo on CPUs")
    distributed_timeout_minutes: int = setting(
        360, "how long processes wait for each other (cache building happens between barriers)")

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


# Settings that may change between a run and its resumption; every other one must match.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "validate_every", "log_every",
     "num_workers", "device", "compile", "backend", "distributed_timeout_minutes"}
)


def apply_run_defaults(raw_run: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The user's [run] values over a task's own defaults."""
    return {**defaults, **raw_run}
