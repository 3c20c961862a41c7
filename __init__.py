"""ComfyUI-X2I: new condition encoders (other languages, T5, sound, point clouds, LLMs) for the
diffusion models you already have, through GlueGen's GlueNets, LaVi-Bridge and intermediate fusion.

Only this module and ``nodes/`` know about ComfyUI; the model code imports and runs without it.
"""

import re
import sys

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


# ComfyUI has imported `comfy` before it loads custom nodes; the trainer and the tests import the pack without it.
if "comfy" in sys.modules:
    from comfyui_version import __version__ as _comfyui_version

    check_comfyui_version(_comfyui_version)


async def comfy_entrypoint():
    # Imported lazily so that the model packages stay importable without ComfyUI.
    from .nodes import X2IExtension

    extension = X2IExtension()
    await extension.on_load()  # ComfyUI 0.3.64 does not call it itself; copying the samples again is a no-op
    return extension
