"""In-process ComfyUI: the pack's nodes called directly, with ComfyUI's real model management.

Skipped unless COMFYUI_PATH points at a ComfyUI checkout. ComfyUI goes first on sys.path so that its
top-level modules (``nodes``, ``utils``) win over same-named folders of this repository.

ComfyUI runs in the memory mode of the device switch (tests/conftest.py): ``--device cpu`` is ComfyUI's
``--cpu``; ``--device cuda`` is its GPU mode, with ``--lowvram`` or ``--novram`` for ``--comfy-vram
lowvram`` / ``novram``. ComfyUI reads these flags once, when comfy.model_management is first imported,
so one pytest process tests one mode.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too so --strict-markers holds whatever pyproject.toml declares.
    config.addinivalue_line("markers", "comfy: imports ComfyUI in-process (needs COMFYUI_PATH)")


def pytest_collection_modifyitems(config, items):
    """Mark everything in this directory ``comfy``; skip (not error) it without ComfyUI.

    This hook sees the items of the whole session, hence the directory filter."""
    ours = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    for item in ours:
        item.add_marker(pytest.mark.comfy)
    if os.environ.get("COMFYUI_PATH"):
        return
    skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: in-process node tests need a ComfyUI checkout (see README)")
    for item in ours:
        item.add_marker(skip)


def comfy_memory_flags(device: str, vram: str) -> dict[str, bool]:
    """ComfyUI's command-line memory flags (``comfy.cli_args.args`` attributes) for a setting of the switch."""
    return {"cpu": device == "cpu", "lowvram": vram == "lowvram", "novram": vram == "novram"}


def expected_vram_state(mm, device: str, vram: str):
    """The ``VRAMState`` ComfyUI settles on for those flags (DISABLED: no GPU in use)."""
    if device == "cpu":
        return mm.VRAMState.DISABLED
    return {"normal": mm.VRAMState.NORMAL_VRAM, "lowvram": mm.VRAMState.LOW_VRAM, "novram": mm.VRAMState.NO_VRAM}[vram]


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, pytestconfig, device):
    """ComfyUI's modules, imported in the memory mode of ``--device`` / ``--comfy-vram``, with model folders
    redirected to a temp dir. Requesting ``device`` keeps float32 float32 on CUDA (no TF32)."""
    chosen, vram = pytestconfig.getoption("--device"), pytestconfig.getoption("--comfy-vram")
    root = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, root)
    import comfy.cli_args

    imported_before = "comfy.model_management" in sys.modules
    for flag, value in comfy_memory_flags(chosen, vram).items():
        setattr(comfy.cli_args.args, flag, value)  # must precede comfy.model_management
    import comfy.model_management as mm
    import folder_paths

    wanted = expected_vram_state(mm, chosen, vram)
    if mm.vram_state != wanted or (mm.cpu_state == mm.CPUState.CPU) != (chosen == "cpu"):
        pytest.fail(
            f"ComfyUI runs with vram state {mm.vram_state.name} and cpu state {mm.cpu_state.name}, but --device {chosen} "
            f"--comfy-vram {vram} asks for {wanted.name}"
            + (" (comfy.model_management was imported before this fixture set the flags)" if imported_before else ""),
            pytrace=False,
        )

    models = tmp_path_factory.mktemp("comfy_models")
    folder_paths.models_dir = str(models)
    for name in ("text_encoders", "x2i_text_encoders", "gluenet"):
        (models / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], set(folder_paths.supported_pt_extensions))
    return {"models": models, "mm": mm, "folder_paths": folder_paths, "vram": vram}


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's ``nodes`` package, imported after ComfyUI (the rest of the pack is ``x2i``, imported by
    the test suite the way ComfyUI's loader imports a custom-node folder)."""
    return importlib.import_module("x2i.nodes")


@pytest.fixture(scope="session")
def spanish_text_gluenet_state() -> dict:
    from support.models import random_state_dict, translator_noln_layout

    return random_state_dict(translator_noln_layout(77, 64, 768, depth=2), seed=2)


@pytest.fixture(scope="session")
def installed(comfy, tiny_xlmr, small_text_gluenet_ckpt, spanish_text_gluenet_state):
    """Model files placed where a user puts them; the French and Spanish GlueNets have different weights,
    so routing to the wrong one shows in the numbers."""
    models = comfy["models"]
    shutil.copytree(tiny_xlmr, models / "text_encoders" / "xlm-roberta-tiny", dirs_exist_ok=True)
    shutil.copy(small_text_gluenet_ckpt, models / "gluenet" / "gluenet_French_clip_overnorm_over3_noln.ckpt")
    torch.save(spanish_text_gluenet_state, models / "gluenet" / "gluenet_Spanish_clip_overnorm_over3_noln.ckpt")
    (models / "gluenet" / "not_a_gluenet.safetensors").write_bytes(b"garbage")
    return models
