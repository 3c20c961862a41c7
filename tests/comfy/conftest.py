"""In-process ComfyUI: the pack's nodes called directly, with ComfyUI's real model management.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout. ComfyUI goes first on sys.path so that its
top-level modules (``nodes``, ``utils``) win over same-named folders of this repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMFYUI_PATH"):
        return
    skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: in-process node tests need a ComfyUI checkout (see README)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI's modules, imported on the CPU with model folders redirected to a temp dir."""
    root = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # must precede comfy.model_management
    import comfy.model_management
    import folder_paths

    models = tmp_path_factory.mktemp("comfy_models")
    folder_paths.models_dir = str(models)
    for name in ("text_encoders", "x2i_text_encoders", "gluenet"):
        (models / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], set(folder_paths.supported_pt_extensions))
    return {"models": models, "mm": comfy.model_management, "folder_paths": folder_paths}


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's ``nodes`` package, imported after ComfyUI (the rest of the pack is ``x2i``, imported by
    the test suite the way ComfyUI's loader imports a custom-node folder)."""
    return importlib.import_module("x2i.nodes")


@pytest.fixture(scope="session")
def installed(comfy, tiny_xlmr, small_text_gluenet_ckpt):
    """Model files placed where a user puts them."""
    models = comfy["models"]
    shutil.copytree(tiny_xlmr, models / "text_encoders" / "xlm-roberta-tiny", dirs_exist_ok=True)
    for language in ("French", "Spanish"):
        shutil.copy(small_text_gluenet_ckpt, models / "gluenet" / f"gluenet_{language}_clip_overnorm_over3_noln.ckpt")
    (models / "gluenet" / "not_a_gluenet.safetensors").write_bytes(b"garbage")
    return models
