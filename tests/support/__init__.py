"""Helpers of the test suite, one module per thing they build or measure:

* ``models``          tiny real-architecture models and official-format files (checkpoints, folders, layouts)
                      and independent references of the official computations (golden helpers);
* ``precision``       the half-precision bounds (``HALF_TOLERANCE``) and ``assert_close_in_half``;
* ``cost``            ``cost_of``: the time and peak memory of one call, measured in a fresh process;
* ``training``        configs, data sets and CLI runs for the trainer tests (GlueNet, U-ViT);
* ``bridge_training`` tiny U-Nets, language models and data sets for the LaVi-Bridge trainer tests;
* ``toy_task``        a toy training task for the shared training runtime;
* ``sd15_unet``       ComfyUI's SD1.5 U-Net config and a seeded full-size U-Net (in-process node tests);
* ``sd15_checkpoint`` a random-weight SD1.5 single-file checkpoint (a script, run in a subprocess);
* ``comfy_server``    a headless ComfyUI server with this pack loaded (integration tests);
* ``ui_workflow``     ComfyUI UI workflow JSON -> API prompt.

Importing the package imports this repository as the package ``x2i`` (the way ComfyUI imports a custom
node folder), so ``tests/conftest.py`` imports it before any test module imports ``x2i``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "x2i"


def import_pack(name: str = PACK_NAME):
    """This repository as the package ``x2i``, the way ComfyUI imports a custom-node folder.

    The pack's modules import each other relatively (``from ..weights import ...``), so they are only
    importable through the package; this is how tests and benchmarks reach them without ComfyUI.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


import_pack()
