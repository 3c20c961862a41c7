"""The SDXL-family test checkpoint the ``sdxl_checkpoint`` fixture gives: the SGM single-file layout in fp16,
a U-Net and a VAE and no text encoders, tagged with its recipe version. Read from the file's header only; that
ComfyUI loads it as an SDXL-family model without a CLIP is checked when it is built (tests/support/sdxl_checkpoint.py),
and that KSampler samples it, by the SDXL workflows (tests/integration/test_sdxl_workflows.py)."""

from __future__ import annotations

from pathlib import Path

from support.sd15_checkpoint import RECIPE_METADATA_KEY, safetensors_header
from support.sdxl_checkpoint import RECIPE_VERSION
from support.workflow_models import SDXL_CHECKPOINT

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def test_the_sdxl_checkpoint_is_an_fp16_sdxl_unet_and_vae_without_text_encoders(sdxl_checkpoint: Path) -> None:
    assert sdxl_checkpoint.name == SDXL_CHECKPOINT
    header = safetensors_header(sdxl_checkpoint)
    metadata = header.pop("__metadata__")
    assert metadata == {RECIPE_METADATA_KEY: RECIPE_VERSION}

    assert not [key for key in header if not key.startswith((UNET_PREFIX, VAE_PREFIX))]  # no conditioner.embedders.*
    assert {entry["dtype"] for entry in header.values()} == {"F16"}
    # SDXL's widths: 320 channels from 4 latent channels, the 2816-wide class embedding (pooled 1280 + 6 x 256),
    # 2048-wide cross-attention keys in the first transformer (input block 4) and in the middle block.
    assert header[f"{UNET_PREFIX}input_blocks.0.0.weight"]["shape"] == [320, 4, 3, 3]
    assert header[f"{UNET_PREFIX}label_emb.0.0.weight"]["shape"] == [1280, 2816]
    assert header[f"{UNET_PREFIX}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]["shape"] == [640, 2048]
    assert header[f"{UNET_PREFIX}middle_block.1.transformer_blocks.0.attn2.to_k.weight"]["shape"] == [1280, 2048]
    assert header[f"{VAE_PREFIX}decoder.conv_out.weight"]["shape"] == [3, 128, 3, 3]

