"""What a user watches while a run trains, all in ``run.output_dir``: ``train.log`` (the ``x2i`` log),
``metrics.jsonl`` (a line of loss terms every ``run.log_every`` steps, one per validation),
``loss_curve.png`` (redrawn at every checkpoint) and a progress bar with the loss and samples/s. Rank 0
writes them; every process takes part in the means over processes."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..weights import write_atomic
from .distributed import Distributed
from .errors import writing

log = logging.getLogger("x2i.training")


def attach_log_file(output_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(output_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("x2i")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger("x2i").removeHandler(handler)
    handler.close()


class RunReport:
    """metrics.jsonl, the progress bar and the loss curve of one run (see the module docstring)."""

    def __init__(self, output_dir: Path, dist: Distributed, kind: str, total_steps: int, first_step: int, batch_size: int) -> None:
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.dist = dist
        self.batch_size = batch_size
        self.progress = None
        if dist.is_main:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=first_step, desc=f"train {kind}", unit="step", dynamic_ncols=True)
        self.window_start, self.window_samples = time.perf_counter(), 0

    def record(self, entry: dict[str, Any]) -> None:
        if self.dist.is_main:
            # An append-only log: a torn last line costs one record, never an earlier one.
            with writing("the metrics log"), self.metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def training_step(self, step: int, epoch: int, terms: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                      due: bool) -> None:
        """After each optimiser step: when ``due``, the terms' means over processes, the learning rate and
        samples/s since the last record go to metrics.jsonl and the progress bar."""
        self.window_samples += self.batch_size
        if due:
            values = {k: self.dist.all_reduce_mean(v.detach().float()).item() for k, v in terms.items()}
            elapsed = time.perf_counter() - self.window_start
            rate = self.window_samples / elapsed if elapsed > 0 else math.nan
            lr = optimizer.param_groups[0]["lr"]
            self.record({"step": step, "epoch": epoch, "split": "train", "lr": lr, "samples_per_s": rate, **values})
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{values['loss']:.4g}", samples_s=f"{rate:.0f}", refresh=False)
                log.debug("step %d loss %.6g lr %.3g %.1f samples/s", step, values["loss"], lr, rate)
            self.window_start, self.window_samples = time.perf_counter(), 0
        if self.progress is not None:
            self.progress.update(1)

    def validation(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        self.record({"step": step, "epoch": epoch, "split": "val", **values})
        log.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def draw_loss_curve(self, checkpoint: Path) -> None:
        """Rank 0, after ``checkpoint`` is written."""
        if self.metrics_path.exists():
            with writing("the loss curve", f"{checkpoint.name} is written; free disk space and run the same command again"):
                plot_loss_curve(self.metrics_path, self.output_dir / "loss_curve.png")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


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
