"""Names and sizes of the stand-in models the shipped workflows run on in the integration tests.

The files themselves are written by session fixtures in tests/integration/conftest.py; the tests that
name a file or a size import it from here, so each is spelled once."""

from __future__ import annotations

from x2i.uvit import UViTConfig

# LaVi-Bridge: a kohya-style LoRA on one cross-attention layer, named the way ComfyUI maps SD1.x LoRAs.
SECOND_LORA = "second_lora.safetensors"
SECOND_LORA_KEY = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
PIXART_TEST_DEPTH = 2

# SDXL: the random-weight SDXL-family checkpoint (tests/support/sdxl_checkpoint.py; no text encoders), by the
# name it is cached under and Load Checkpoint lists it as.
SDXL_CHECKPOINT = "sdxl_random.safetensors"

# U-ViT: the released file names; heads = width // 64 and 77 tokens x 768 as the released models have.
UVIT_FILE = "uvit_small_mscoco.safetensors"
CLIP_FILE = "clip_l.safetensors"
VAE_FILE = "vae-ft-mse-840000-ema-pruned.safetensors"
SD_IN_WRONG_FOLDER = "sd15_in_diffusion_models.safetensors"
UVIT_TEST_SIZE = 64  # pixels; the tiny U-ViT's 8×8 latents
TINY_UVIT = UViTConfig("cross", "intermediate", n_image=1, n_text=1, image_size=UVIT_TEST_SIZE // 8, width=128, depth=4, heads=2)

DEFAULT_TEST_SIZE = 64
# ComfyUI's PixArt derives its position-embedding base size from round(latent side / 64): at least
# 33 latent pixels, or it divides by zero. 320 px is the smallest round size above that.
PIXART_TEST_SIZE = 320
TEST_SIZES = {"lavibridge_t5_pixart.json": PIXART_TEST_SIZE, "uvit_text_to_image.json": UVIT_TEST_SIZE}


def shrunk_size(workflow: str) -> int:
    """The image side, in pixels, a shipped workflow is shrunk to so a 2-core CPU samples it in seconds."""
    return TEST_SIZES.get(workflow, DEFAULT_TEST_SIZE)
