"""Build a random-weight, SDXL-family single-file checkpoint without text encoders.

Run as a script in a subprocess (see ``sdxl_checkpoint`` in tests/integration/conftest.py) so that the
pytest process never imports ``comfy``:

    python tests/support/sdxl_checkpoint.py --comfyui /path/to/ComfyUI --out /cache/sdxl_random.safetensors

The file has the layout of the original SGM single-file SDXL checkpoints (``model.diffusion_model.*``,
``first_stage_model.*``, fp16) so ComfyUI's ``load_checkpoint_guess_config`` detects it as a member of
the SDXL family (``comfy.model_base.SDXL``: context 2048, ADM input 2816 = pooled 1280 + six size
embeddings of 256). The U-Net keeps SDXL's real widths (model_channels 320, channel_mult [1, 2, 4],
num_res_blocks 2, heads of 64 channels, linear proj_in/proj_out) with the transformer depths of Segmind
Vega ([0, 0, 1, 1, 2, 2] instead of SDXL's [0, 0, 2, 2, 10, 10]), an SDXL-family U-Net ComfyUI supports and
detects as ``comfy.supported_models.Segmind_Vega``. Its middle block has one transformer block (detected
transformer_depth_middle 1), the shallowest middle block with attention: detection also accepts 0 (a
transformer without blocks), -1 (Vega's own: one ResBlock; 745M U-Net parameters) and -2 (no middle block;
714M), but those leave the middle block without the cross-attention the pack's block conditioning uses by
default. The VAE is the SD KL-f8 one SDXL shares with SD1.x (built by sd15_checkpoint.py). Weights are random but small, exactly as
sd15_checkpoint.py fills them, so sampling produces finite (meaningless) images.

There are no text encoders (no ``conditioner.embedders.*``): the workflows that use this file encode their
prompts with the pack's own encoders. ComfyUI then logs "no CLIP/text encoder weights in checkpoint, the
text encoder model will not be loaded." and loads MODEL and VAE, with CLIP None.

Measured (ComfyUI 0.3.64, torch on a shared 2-core CPU): U-Net 814,401,924 + VAE 83,653,863 = 898,055,787
parameters; 1,796,225,582 bytes on disk (1.67 GiB, 848 tensors); a cold build, ComfyUI's load check included,
takes 14-25 s and peaks at 5.9 GB RSS. The build is deterministic (byte-identical files).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

# The shared pieces: a sibling module when this file runs as a script.
try:
    from .sd15_checkpoint import build_components, build_vae, fill_small_random, prefixed_fp16, run_script
    from .sd15_checkpoint import write_checkpoint as _write_checkpoint
except ImportError:
    from sd15_checkpoint import build_components, build_vae, fill_small_random, prefixed_fp16, run_script
    from sd15_checkpoint import write_checkpoint as _write_checkpoint

# Bumped whenever the recipe changes, so stale cached files get rebuilt (stored under sd15_checkpoint's
# RECIPE_METADATA_KEY).
RECIPE_VERSION = "1"

# The U-Net config comfy/model_detection.py's detect_unet_config produces for the file (ComfyUI adds
# num_heads -1, num_head_channels 64 and the dtype when it builds the model).
SDXL_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# The supported-model class ComfyUI matches to SDXL_UNET (a subclass of its SDXL config).
SUPPORTED_MODEL = "Segmind_Vega"
# What comfy/sd.py logs when a checkpoint has no text encoder weights.
NO_CLIP_WARNING = "no CLIP/text encoder weights in checkpoint"


def _build_unet(generator: Any) -> dict[str, Any]:
    import comfy.model_detection  # noqa: PLC0415
    import torch  # noqa: PLC0415

    unet_config = dict(SDXL_UNET, dtype=torch.float32)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError("ComfyUI did not recognise the SDXL-family U-Net config")
    unet = model_config.get_model({}).diffusion_model
    fill_small_random(unet, generator)
    return prefixed_fp16(unet, "model.diffusion_model.")


def build_state_dict(seed: int = 0) -> dict[str, Any]:
    return build_components((_build_unet, build_vae), seed)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_loads_as_sdxl(path: Path) -> None:
    """Fail unless ComfyUI's own loader sees an SDXL-family MODEL (the detected config SDXL_UNET) and a VAE,
    and, saying so in its log, no CLIP."""
    import comfy.model_base  # noqa: PLC0415
    import comfy.sd  # noqa: PLC0415

    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    finally:
        logging.getLogger().removeHandler(records)
    model_config = model.model.model_config
    if type(model_config).__name__ != SUPPORTED_MODEL or not isinstance(model.model, comfy.model_base.SDXL):
        raise RuntimeError(f"checkpoint detected as {type(model_config).__name__} ({type(model.model).__name__}), "
                           f"not {SUPPORTED_MODEL} (SDXL)")
    detected = {key: model_config.unet_config.get(key) for key in SDXL_UNET}
    if detected != SDXL_UNET:
        raise RuntimeError(f"ComfyUI detected the U-Net config {detected}, not {SDXL_UNET}")
    if vae is None:
        raise RuntimeError("checkpoint is missing its VAE part")
    if clip is not None:
        raise RuntimeError("ComfyUI built a CLIP from a checkpoint meant to have no text encoders")
    if not any(NO_CLIP_WARNING in message for message in records.messages):
        raise RuntimeError(f"ComfyUI did not log {NO_CLIP_WARNING!r}; it logged {records.messages}")


def write_checkpoint(out: Path) -> None:
    _write_checkpoint(out, build_state_dict, check_loads_as_sdxl, RECIPE_VERSION)


def main(argv: list[str] | None = None) -> int:
    return run_script(argv, __doc__.splitlines()[0], write_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
