"""What every benchmark here shares: dtypes by name, synchronised median timing, a device label."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` calls, the device synchronised."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass(frozen=True)
class StepTimes:
    median_s: float
    warmup_s: float
    last: object  # what the last timed step returned (e.g. its loss)


def time_training_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> StepTimes:
    """Median wall time of a training ``step`` (gradients on) after ``warmup`` calls, the device
    synchronised around each; CUDA's peak-memory counter restarts after warm-up (steady state)."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, last = [], None
    for _ in range(steps):
        start = time.perf_counter()
        last = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return StepTimes(statistics.median(times), warmup_s, last)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def emit(result: dict, out: Path | None) -> None:
    """One JSON line to stdout and, when ``out`` is given, appended to that file."""
    line = json.dumps(result)
    sys.stdout.write(line + "\n")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")
