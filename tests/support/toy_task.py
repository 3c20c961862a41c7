"""A small but complete TrainingTask (noisy linear regression with dropout, a buffer, Adam and a
step schedule) that exercises every part of the shared training loop quickly."""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
from pathlib import Path

import torch
from torch import nn

import support  # noqa: F401  (imports this repository as the package x2i)
from x2i.training import Distributed, TrainingTask
from x2i.training.config import as_dict
from x2i.weights import save_safetensors_atomic


@dataclasses.dataclass
class ToySettings:
    samples: int = 96
    features: int = 6
    lr: float = 0.1
    dropout: float = 0.02
    optimizer: str = "adam"  # or "sgd": plain steps, so a wrongly scaled gradient shows in the weights
    # Test hooks: at this step the model sends itself a signal (signal_count times), raises, or shrinks the
    # file-size limit.
    signal_at: int = 0
    signal_name: str = "SIGTERM"
    signal_count: int = 1
    crash_at: int = 0
    file_limit_at: int = 0


class RegressionSet(torch.utils.data.Dataset):
    def __init__(self, samples: int, features: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(samples, features, generator=generator)
        weights = torch.linspace(-1, 1, features)
        self.y = self.x @ weights + 0.05 * torch.randn(samples, generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class ToyModel(nn.Module):
    def __init__(self, settings: ToySettings, dist: Distributed) -> None:
        super().__init__()
        self.settings = settings
        self.dist = dist
        self.linear = nn.Linear(settings.features, 1)
        self.frozen = nn.Linear(settings.features, settings.features)
        self.frozen.requires_grad_(False)
        self.dropout = nn.Dropout(settings.dropout)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.calls = 0

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x)).squeeze(-1) + 0 * self.frozen.weight.sum()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.settings.signal_at:
            for _ in range(self.settings.signal_count):
                os.kill(os.getpid(), getattr(signal, self.settings.signal_name))
        if self.calls == self.settings.crash_at:
            raise RuntimeError("simulated crash")
        if self.calls == self.settings.file_limit_at:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        self.seen += batch["y"].numel()
        error = (self.predict(batch["x"]) - batch["y"]).pow(2).mean()
        return {"loss": error, "mse": error.detach()}


class ToyTask(TrainingTask):
    kind = "toy"
    SECTIONS = {"toy": ToySettings}

    def __init__(self, settings: ToySettings) -> None:
        self.settings = settings

    @classmethod
    def from_config(cls, raw: dict) -> ToyTask:
        return cls(cls.read_sections(raw)["toy"])

    def config(self) -> dict:
        values = as_dict(self.settings)
        for hook in ("signal_at", "signal_name", "signal_count", "crash_at", "file_limit_at"):
            values.pop(hook)
        return {"toy": values}

    def prepare(self, dist, log, *, dry_run: bool = False) -> None:
        self.data = RegressionSet(self.settings.samples, self.settings.features, seed=1)
        self.held_out = RegressionSet(32, self.settings.features, seed=2)

    def describe(self) -> dict:
        return {"samples": len(self.data)}

    def train_dataset(self):
        return self.data

    def build_model(self, dist: Distributed) -> nn.Module:
        return ToyModel(self.settings, dist)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.settings.lr)
        return torch.optim.Adam(params, lr=self.settings.lr)

    def build_scheduler(self, optimizer, steps_per_epoch: int, total_steps: int):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=0.5)

    def validate(self, model: ToyModel) -> dict[str, float]:
        return {"mse": (model.predict(self.held_out.x) - self.held_out.y).pow(2).mean()}

    def export(self, model: ToyModel, output_dir: Path) -> list[Path]:
        path = output_dir / "toy.safetensors"
        save_safetensors_atomic(model.linear.state_dict(), path, {"kind": "toy"})
        return [path]
