"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint is one safetensors file, ``<run.output_dir>/checkpoints/step-NNNNNNNN.safetensors``: the
model's trainable parameters and buffers (``model.*``; frozen weights come from their own files), the
optimiser's tensors (``optimizer.<param>.<key>``), every process's random state (``rng.<rank>.*``) and, in
the ``x2i.checkpoint`` metadata, the rest as JSON: the position in the run, the optimiser's and scheduler's
plain state, and the run's identity (kind, task config and the [run] settings a resume must not change).

Exact resume: the sample order is a pure function of (seed, epoch) (:mod:`.loop`), the checkpoint records
the position in it, and every rank's RNG states, the optimiser and the scheduler are restored, so a run
killed at any step and resumed ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..weights import save_safetensors_atomic
from .config import ConfigError, differing_leaves, move_keys
from .distributed import Distributed
from .errors import TrainingError, writing
from .settings import RESUMABLE_CHANGES, RunSettings
from .task import TrainingTask

log = logging.getLogger("x2i.training")

CHECKPOINT_FORMAT = "x2i.training-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class Position:
    """Where the run stands: optimiser steps taken, and the next batch of which epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


@dataclasses.dataclass
class TrainState:
    """What a checkpoint saves and restores besides the random streams: the task's model (never a wrapper),
    its optimiser and scheduler, and where the run stands."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    position: Position = dataclasses.field(default_factory=Position)


@dataclasses.dataclass
class SavedRun:
    """A checkpoint as read back: its tensors, its JSON header and where it came from."""

    path: Path
    tensors: dict[str, torch.Tensor]
    header: dict[str, Any]


# --- what a checkpoint holds --------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: what a checkpoint must hold (frozen weights come from their files)."""
    # remove_duplicate=False: a tied weight (T5's embed_tokens = shared) is frozen under every name.
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


# --- files --------------------------------------------------------------------------------------------


def checkpoint_files(output_dir: Path) -> list[Path]:
    folder = output_dir / CHECKPOINT_DIR
    return sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []


def save_checkpoint(path: Path, state: TrainState, rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
                    identity: Mapping[str, Any]) -> None:
    """``state``, every process's random state (``rng``, by rank) and the run's identity, atomically to ``path``."""
    tensors = {f"model.{k}": v for k, v in trainable_state(state.model).items()}
    optimizer_tensors, optimizer_plain = _optimizer_tensors(state.optimizer)
    tensors.update(optimizer_tensors)
    rng_plain = []
    for rank, (rank_tensors, plain) in enumerate(rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rank_tensors.items()})
        rng_plain.append(plain)
    header = {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "position": dataclasses.asdict(state.position),
        "optimizer": optimizer_plain,
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
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


def write_checkpoint(output_dir: Path, state: TrainState, identity: Mapping[str, Any], keep: int, dist: Distributed) -> Path | None:
    """Every process's random state gathered, then (rank 0) the checkpoint of ``state`` written and all but
    the newest ``keep`` removed; the written path on rank 0, ``None`` elsewhere."""
    rng = dist.gather_objects(rng_state(dist.device))
    if not dist.is_main:
        return None
    path = output_dir / CHECKPOINT_DIR / f"step-{state.position.step:08d}.safetensors"
    save_checkpoint(path, state, rng, identity)
    with writing("removing old checkpoints", f"{path.name} is written; fix the folder's permissions and run the same command again"):
        for old in checkpoint_files(output_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


# --- resuming -----------------------------------------------------------------------------------------


def run_identity(task: TrainingTask, settings: RunSettings, world_size: int) -> dict[str, Any]:
    run = {k: v for k, v in dataclasses.asdict(settings).items() if k not in RESUMABLE_CHANGES}
    return {"kind": task.kind, "task": json.loads(json.dumps(task.config(), default=str)), "run": run, "world_size": world_size}


def _differences(saved: Any, current: Any, section: str = "") -> list[str]:
    return [f"{'.'.join(p for p in (section, key) if p)}: checkpoint {old!r}, now {new!r}"
            for key, old, new in differing_leaves(saved, current, "<absent>")]


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


def load_resume(output_dir: Path, resume: str, identity: Mapping[str, Any], renamed: Mapping[str, str]) -> SavedRun | None:
    """The checkpoint this run continues (``--resume``: auto, never or a file), checked against the run's
    identity; a checkpoint written before a key was renamed (``renamed``: old -> new) compares under the
    new name. ``None``: a fresh run."""
    source = _resume_source(output_dir, resume)
    if source is None:
        return None
    tensors, header = read_checkpoint(source)
    saved_task, _ = move_keys(header["identity"]["task"], renamed)
    differences = _differences(header["identity"]["kind"], identity["kind"], "kind") + _differences(
        saved_task, identity["task"]) + _differences(header["identity"]["run"], identity["run"], "run")
    if differences:
        raise ConfigError(
            f"the config disagrees with checkpoint {source}: " + "; ".join(differences[:8])
            + ". Resume with the original settings, or start a new run in another run.output_dir"
        )
    return SavedRun(source, tensors, header)


def restore(saved: SavedRun, state: TrainState, dist: Distributed) -> None:
    """``saved`` loaded into ``state`` (model, optimiser, scheduler, position) and this process's random streams."""
    tensors, header = saved.tensors, saved.header
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = trainable_state(state.model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        raise TrainingError(
            f"the checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {wrong[:3]}; it belongs to another configuration"
        )
    state.model.load_state_dict(weights, strict=False)
    state.optimizer.load_state_dict(_optimizer_state(tensors, header["optimizer"]))
    if state.scheduler is not None and header.get("scheduler") is not None:
        state.scheduler.load_state_dict(header["scheduler"])
    if len(header["rng"]) != dist.world_size:
        # The math of a global batch does not depend on the process count, but the noise each rank
        # draws does: continue correctly, not bit-identically.
        step = header["position"]["step"]
        seed_everything(header["identity"]["run"]["seed"] + 7919 * step, dist.rank)
        if dist.is_main:
            log.warning(
                "the checkpoint was written by %d processes and this run has %d: training continues with fresh random "
                "streams, so it will not repeat an uninterrupted run bit for bit", len(header["rng"]), dist.world_size,
            )
    else:
        rank_tensors = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{dist.rank}.")}
        _set_rng_state(rank_tensors, header["rng"][dist.rank], dist.device)
    state.position = position = Position(**header["position"])
    if dist.is_main:
        log.info("resumed from %s at step %d (epoch %d, batch %d)", saved.path, position.step, position.epoch, position.step_in_epoch)
