"""ComfyUI-X2I's command line, run on the pack's folder (no ComfyUI needed):

    python path/to/ComfyUI-X2I convert-gluenet gluenet_French_clip_overnorm_over3_noln.ckpt gluenet_fr.safetensors
    python path/to/ComfyUI-X2I convert-uvit mscoco_uvit_small.pth uvit_small_mscoco.safetensors
    python path/to/ComfyUI-X2I train gluenet --config my_gluenet.toml     (train --help for more)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# command -> module with a main(argv) -> int
COMMANDS = {"convert-gluenet": "x2i.gluenet.convert", "convert-uvit": "x2i.uvit.convert", "train": "x2i.training.cli"}


def _import_pack() -> None:
    # The pack's modules import each other relatively, so they are reached through the package, as
    # ComfyUI's loader reaches them.
    if "x2i" not in sys.modules:
        spec = importlib.util.spec_from_file_location("x2i", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["x2i"] = module
        spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        sys.stderr.write(f"{__doc__}\ncommands: {', '.join(COMMANDS)} (each takes --help)\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _import_pack()
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
