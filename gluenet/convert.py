"""Convert a released GlueGen ``.ckpt`` into this pack's safetensors format.

    python path/to/ComfyUI-X2I convert-gluenet gluenet_French_clip_overnorm_over3_noln.ckpt gluenet_fr.safetensors
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from .checkpoint import load_gluenet, save_gluenet

logger = logging.getLogger(__name__)


def convert(source: Path, destination: Path, language: str | None = None, encoder_hint: str | None = None) -> None:
    """Load ``source`` strictly (any supported GlueNet file) and write it as safetensors with its config."""
    model = load_gluenet(source)
    overrides = {k: v for k, v in (("language", language), ("encoder_hint", encoder_hint)) if v is not None}
    if overrides:
        model.config = replace(model.config, **overrides)
    save_gluenet(model, destination, {"converted_from": source.name})
    logger.info("Wrote %s (%s, language=%s)", destination, model.config.architecture, model.config.language)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python path/to/ComfyUI-X2I convert-gluenet", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="released gluenet_*.ckpt (or any GlueNet file)")
    parser.add_argument("destination", type=Path, help="output .safetensors path")
    parser.add_argument("--language", help="ISO 639-1 code to record (default: read from the file name)")
    parser.add_argument("--encoder-hint", help="name of the source encoder, shown in mismatch errors")
    args = parser.parse_args(argv)
    if args.destination.suffix != ".safetensors":
        parser.error("destination must end in .safetensors")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert(args.source, args.destination, args.language, args.encoder_hint)
    return 0
