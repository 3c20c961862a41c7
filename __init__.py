"""ComfyUI-X2I: new condition encoders (other languages, T5, sound, point clouds, LLMs) for the
diffusion models you already have, through GlueGen's GlueNets, LaVi-Bridge and intermediate fusion.

Only this module and ``nodes/`` know about ComfyUI; the model code imports and runs without it.
"""

import re
import sys
from importlib import metadata

# Served by ComfyUI at /extensions/<this folder>/: the node help pages (web/docs/<NodeId>[/<locale>].md).
WEB_DIRECTORY = "./web"
# The oldest ComfyUI the suite runs against; pyproject.toml's requires-comfyui says the same (a test keeps them equal).
MINIMUM_COMFYUI = "0.3.64"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def check_comfyui_version(version: str) -> None:
    """Refuse to load into a ComfyUI older than :data:`MINIMUM_COMFYUI`, saying which and how to update."""
    if _release(version) < _release(MINIMUM_COMFYUI):
        raise ImportError(
            f"ComfyUI-X2I needs ComfyUI {MINIMUM_COMFYUI} or newer, but this is ComfyUI {version}: its node API "
            "lacks what the pack's nodes use. Update ComfyUI (git pull, ComfyUI-Manager's 'Update ComfyUI', or the "
            "desktop app's updater), then restart."
        )


# The oldest torch and transformers the pack supports; requirements.txt, pyproject.toml and README's Install say the
# same (tests/test_versions.py keeps them equal). torch is ComfyUI's own and never installed by the pack: 2.6 is the
# first whose torch.load(weights_only=True) cannot be made to run code (CVE-2025-32434). transformers 4.57.3 is the
# oldest an official ComfyUI build ships (the desktop app for Windows AMD; its others ship 5.x), and the one CI's
# compatibility run (.ci/compat, requirements-compat.txt) runs the node, encoder and checkpoint tests against.
MINIMUM_TORCH = "2.6"
MINIMUM_TRANSFORMERS = "4.57.3"
_FIXES = {
    "torch": "torch is ComfyUI's own, so update it the way ComfyUI was installed: the desktop app's or the portable "
    "build's updater, or pip install --upgrade torch torchvision torchaudio --index-url "
    "https://download.pytorch.org/whl/<your build, e.g. cu128> in the Python that runs ComfyUI",
    "transformers": f'run pip install --upgrade "transformers>={MINIMUM_TRANSFORMERS}" in the Python that runs ComfyUI',
}


def _installed_version(name: str) -> str | None:
    """The version of ``name`` this Python would use: the imported module's (ComfyUI has imported torch and
    transformers before it loads custom nodes), else the installed distribution's, without importing it."""
    module = sys.modules.get(name)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_dependency_versions(torch_version: str | None = None, transformers_version: str | None = None) -> None:
    """Refuse to load with a torch older than :data:`MINIMUM_TORCH` or a transformers older than
    :data:`MINIMUM_TRANSFORMERS` (or none), naming the version found, the floor and the fix. Versions default to
    what this Python has."""
    found = {
        "torch": torch_version if torch_version is not None else _installed_version("torch"),
        "transformers": transformers_version if transformers_version is not None else _installed_version("transformers"),
    }
    floors = {"torch": MINIMUM_TORCH, "transformers": MINIMUM_TRANSFORMERS}
    problems = [
        f"{name} {floors[name]} or newer, but this Python has "
        + (f"{name} {version}" if version else f"no {name}")
        + f"; {_FIXES[name]}"
        for name, version in found.items()
        if not version or _release(version) < _release(floors[name])
    ]
    if problems:
        raise ImportError("ComfyUI-X2I needs " + "; and ".join(problems) + ". Then restart ComfyUI.")


# ComfyUI has imported `comfy` before it loads custom nodes; the trainer and the tests import the pack without it.
if "comfy" in sys.modules:
    from comfyui_version import __version__ as _comfyui_version

    check_comfyui_version(_comfyui_version)
    check_dependency_versions()


async def comfy_entrypoint():
    # Imported lazily so that the model packages stay importable without ComfyUI.
    from .nodes import X2IExtension

    extension = X2IExtension()
    await extension.on_load()  # ComfyUI 0.3.64 does not call it itself; copying the samples again is a no-op
    return extension
