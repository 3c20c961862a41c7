"""Held-out ε-MSE for the diffusion trainers (bridge, U-ViT): fixed timesteps, fixed noise, so the
number depends on the weights only and validation never touches the training random streams."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

# The noise of held-out ε-MSE is drawn from this seed (plus the batch's number).
VALIDATION_SEED = 1234
# (latents, noise, timesteps, batch) -> per-sample ε-MSE
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def held_out_eps_mse(
    samples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    latents_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    losses: Mapping[str, PerSampleLoss],
    *,
    timesteps: Sequence[int],
    batch_size: int,
    device: torch.device,
    seed: int = VALIDATION_SEED,
) -> dict[str, torch.Tensor]:
    """Mean per-sample loss at each of ``timesteps`` (a float64 tensor per name in ``losses``)."""
    totals = {name: torch.zeros(len(timesteps), dtype=torch.float64) for name in losses}
    count = 0
    # Batches built by hand: a DataLoader iterator would draw its seed from the training RNG.
    for number, first in enumerate(range(0, len(samples), batch_size)):
        batch = {k: v.to(device) for k, v in collate([samples[i] for i in range(first, min(first + batch_size, len(samples)))]).items()}
        latents = latents_of(batch)
        generator = torch.Generator().manual_seed(seed + number)
        for j, t in enumerate(timesteps):
            noise = torch.randn(latents.shape, generator=generator).to(device)
            steps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            for name, loss in losses.items():
                totals[name][j] += loss(latents, noise, steps, batch).double().sum().cpu()
        count += latents.shape[0]
    return {name: total / count for name, total in totals.items()}


def eps_mse_metrics(per_t: Mapping[str, torch.Tensor], timesteps: Sequence[int]) -> dict[str, float]:
    """What a validation reports of :func:`held_out_eps_mse`'s result: ``val_eps_mse``, the first loss's mean
    over the timesteps; ``val_eps_mse_<name>`` of each other loss; the first loss at each timestep,
    ``val_eps_mse_t<t>``."""
    (_, first), *others = per_t.items()
    metrics = {"val_eps_mse": float(first.mean())}
    metrics.update({f"val_eps_mse_{name}": float(values.mean()) for name, values in others})
    metrics.update({f"val_eps_mse_t{t}": float(v) for t, v in zip(timesteps, first, strict=True)})
    return metrics
