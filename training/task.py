"""The contract between a trainer kind (``gluenet``, ``bridge``, ``uvit``) and the shared loop
(:mod:`.loop`): what a task provides, what it receives, and when each method runs."""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import move_keys, section
from .distributed import Distributed

log = logging.getLogger("x2i.training")


class TrainingTask(abc.ABC):
    """What a trainer kind provides to the shared loop, and what it gets from it.

    A task owns its data, frozen encoders, caches, model, objective, optimiser and export; the loop owns the
    sample order, the steps, processes, precision, checkpoints, resumption and what the user watches.

    Order of calls, in every process: :meth:`from_config`; :meth:`prepare`; :meth:`describe`;
    :meth:`train_dataset`; :meth:`build_model` (the loop then moves the model to ``dist.device`` and, when
    resuming, loads its trainable state); :meth:`build_optimizer`; :meth:`build_scheduler`; every step
    ``model(batch)`` on a batch of :meth:`collate`. On rank 0 only: :meth:`validate` and :meth:`export`.

    **The model a task receives** (``build_optimizer``, ``validate``, ``export``) is the module its own
    ``build_model`` returned, on the run's device: never the ``DistributedDataParallel`` or ``torch.compile``
    wrapper the loop trains it through. Only the loop calls the wrapper, and only ``forward``.

    **Randomness**: the loop seeds every process (``run.seed`` + rank) before and again after ``prepare``,
    and checkpoints the random streams; a task that draws from the global RNG in ``forward`` resumes exactly.
    """

    kind: str = ""
    # The config sections this kind reads besides [run]: name -> settings dataclass.
    SECTIONS: Mapping[str, type] = {}
    # Defaults this kind applies to [run] under the user's own values (e.g. the official grad clip).
    RUN_DEFAULTS: Mapping[str, Any] = {}
    # Keys renamed since a release, "section.key" (old) -> "section.key" (new): configs that use the old name
    # keep working (with a warning), and checkpoints written under it still resume.
    RENAMED: Mapping[str, str] = {}

    @classmethod
    def run_defaults(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """[run] defaults for this config (a kind may vary them, e.g. by modality)."""
        return dict(cls.RUN_DEFAULTS)

    @classmethod
    def read_sections(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Every section of :attr:`SECTIONS` read from ``raw``; a renamed key is read under its new name and
        logged once, naming it."""
        raw, old_names = move_keys(raw, cls.RENAMED)
        for old in old_names:
            log.warning("%s is an old name: the setting is now %s; rename it in your config", old, cls.RENAMED[old])
        return {name: section(raw, name, settings) for name, settings in cls.SECTIONS.items()}

    @classmethod
    @abc.abstractmethod
    def from_config(cls, raw: Mapping[str, Any]) -> TrainingTask:
        """The task of a whole config (its ``[run]`` included, for tasks that need the output folder or seed)."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The task's resolved config: saved in checkpoints and outputs, compared on resume (so it leaves out
        where caches live and how fast they are built: a run may move them)."""

    @abc.abstractmethod
    def prepare(self, dist: Distributed, log: logging.Logger, *, dry_run: bool = False) -> None:
        """Read and check the data, load frozen encoders, build caches (dry_run: check and count only).
        Every process calls it; collectives of ``dist`` are allowed here."""

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
        """A module whose ``forward(batch)`` returns ``{"loss": …, other terms…}`` (means over the local batch).
        Frozen weights keep ``requires_grad=False``: checkpoints hold only trainable parameters and buffers."""

    @abc.abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimiser over ``model`` (the task's own module, see the class docstring)."""

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        """A learning-rate scheduler stepped after every optimiser step, or ``None``."""
        return None

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics, on rank 0 only (so no collectives here), model in eval mode under no_grad."""
        return {}

    @abc.abstractmethod
    def export(self, model: nn.Module, output_dir: Path) -> list[Path]:
        """Write the files the pack's nodes load; return their paths. Rank 0 only."""
