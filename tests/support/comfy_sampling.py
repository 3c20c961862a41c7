"""Sampling through ComfyUI's own ``comfy.sample.sample`` (what KSampler runs), for the in-process node tests."""

from __future__ import annotations

import torch


def sample_latent(model, positive, negative, sampler="euler", scheduler="normal", steps=2, cfg=3.0, side=8, batch=1, seed=0):
    """Sample an empty ``batch`` x 4 x ``side`` x ``side`` latent with ``model``; ``positive`` and ``negative`` are
    CONDITIONING lists, or bare context tensors (wrapped as one conditioning each)."""
    import comfy.sample

    positive, negative = (c if isinstance(c, list) else [[c, {}]] for c in (positive, negative))
    latent = torch.zeros(batch, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=seed)
