"""Convert an upstream U-ViT ``.pth`` into this pack's safetensors format.

    python path/to/ComfyUI-X2I convert-uvit mscoco_uvit_small.pth models/diffusion_models/uvit_small_mscoco.safetensors

Reads the original U-ViT text-to-image layout (baofff/U-ViT ``mscoco_uvit_small.pth``) and the
intermediate-fusion authors' layout (zizhao-hu/U-ViT ``nnet_ema.pth``) with
``torch.load(weights_only=True)``, detects the architecture from the weights, and writes a
safetensors file carrying the config and the sampling convention in its metadata.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .checkpoint import UViTFileError, convert_uvit_file

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python path/to/ComfyUI-X2I convert-uvit", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="U-ViT checkpoint: nnet_ema.pth, mscoco_uvit_small.pth or a .safetensors")
    parser.add_argument("destination", type=Path, help="output .safetensors path (e.g. in models/diffusion_models)")
    parser.add_argument("--heads", type=int, help="attention heads, if not width / 64 as in every released U-ViT")
    args = parser.parse_args(argv)
    if args.destination.suffix != ".safetensors":
        parser.error("destination must end in .safetensors")
    if args.destination.resolve() == args.source.resolve():
        parser.error("destination must differ from source")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = convert_uvit_file(args.source, args.destination, heads=args.heads)
    except UViTFileError as exc:
        logger.error("%s", exc)
        return 1
    logger.info(
        "Wrote %s (%s U-ViT, width %d, %d blocks, %d×%d latents)",
        args.destination, config.name, config.width, config.num_blocks, config.image_size, config.image_size,
    )
    return 0
