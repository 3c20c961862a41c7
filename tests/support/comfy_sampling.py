"""Sampling through ComfyUI's own ``comfy.sample.sample`` (what KSampler runs), for the in-process node tests."""

from __future__ import annotations

import torch

from .sd15_unet import SD15_UNET

# SD1.5's U-Net with 32 instead of 320 channels: same blocks, same attention layout, 768-wide context.
SD15_NARROW = SD15_UNET | {"model_channels": 32}
# SDXL's U-Net config (comfy/model_detection.py) with 64 channels and one transformer per block: the
# same blocks carry cross-attention, 2048-wide, and the same 2816-wide class-embedding input.
SDXL_NARROW = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 64,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}


def narrow_model(family: str, seed: int = 0):
    """A CPU MODEL of ComfyUI's own SD1.5 (``"sd1"``) or SDXL (``"sdxl"``) model class on a narrow U-Net
    (:data:`SD15_NARROW`, :data:`SDXL_NARROW`), float32, seeded random weights (ComfyUI's constructors skip
    initialisation)."""
    import comfy.model_patcher
    import comfy.supported_models

    config = {"sd1": lambda: comfy.supported_models.SD15(SD15_NARROW), "sdxl": lambda: comfy.supported_models.SDXL(SDXL_NARROW)}[family]()
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sample_latent(model, positive, negative, sampler="euler", scheduler="normal", steps=2, cfg=3.0, side=8, batch=1, seed=0):
    """Sample an empty ``batch`` x 4 x ``side`` x ``side`` latent with ``model``; ``positive`` and ``negative`` are
    CONDITIONING lists, or bare context tensors (wrapped as one conditioning each)."""
    import comfy.sample

    positive, negative = (c if isinstance(c, list) else [[c, {}]] for c in (positive, negative))
    latent = torch.zeros(batch, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=seed)
