"""A full-size SD1.5 U-Net for in-process ComfyUI tests: its config, and a MODEL that ComfyUI's own
diffusion-model loader builds (its dtype, its devices) from seeded random weights that can be
recomputed key by key, so a test can compare every weight with the original without keeping a copy."""

from __future__ import annotations

import math
import zlib

import torch

# SD1.5's U-Net config as comfy/model_detection.py detects it (image_size for 256-px latents).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# Its blocks with cross-attention, as ComfyUI names them (``extra_options["block"]``).
SD15_BLOCKS = (
    *(("input", i) for i in (1, 2, 4, 5, 7, 8)), ("middle", 0), *(("output", i) for i in range(3, 12)),
)
SEEDED_STD = 0.02
# Values drawn per key, repeated to fill the tensor: drawing all 860M values takes half a minute on a
# 2-core CPU, repeating 64k of them a second; every key still gets its own values.
SEEDED_BLOCK = 1 << 16


def seeded_weight(key: str, shape) -> torch.Tensor:
    """The float16 value of U-Net weight ``key`` (without ``diffusion_model.``), the same on every call."""
    count = math.prod(shape)
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    block = (torch.randn(min(count, SEEDED_BLOCK), generator=generator) * SEEDED_STD).half()
    return block.repeat(-(-count // block.numel()))[:count].reshape(tuple(shape))


def sd15_unet_shapes() -> dict[str, torch.Size]:
    """Key -> shape of ComfyUI's SD1.5 ``diffusion_model`` state dict (built on the meta device: no memory)."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(SD15_UNET)
    model = config.get_model({}, device=torch.device("meta"))
    return {key: value.shape for key, value in model.diffusion_model.state_dict().items()}


def comfy_sd15_model():
    """The MODEL Load Diffusion Model gives for an fp16 SD1.5 U-Net file of :func:`seeded_weight` values:
    ComfyUI picks the dtype (float32 on the CPU, float16 on a GPU) and the devices of this memory mode."""
    import comfy.sd

    state_dict = {key: seeded_weight(key, shape) for key, shape in sd15_unet_shapes().items()}
    model = comfy.sd.load_diffusion_model_state_dict(state_dict)
    if model is None:
        raise RuntimeError("ComfyUI did not detect the seeded SD1.5 U-Net")
    return model
