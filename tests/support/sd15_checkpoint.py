"""Build a random-weight, SD1.5-architecture single-file checkpoint.

Run as a script in a subprocess (see ``sd15_checkpoint`` in tests/integration/conftest.py) so that the
pytest process never imports ``comfy``:

    python tests/support/sd15_checkpoint.py --comfyui /path/to/ComfyUI --out /cache/sd15_random.safetensors

The file has the layout of the original ``v1-5-pruned-emaonly`` checkpoint
(``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``, fp16) so ComfyUI's
``load_checkpoint_guess_config`` detects it as SD1.5. Weights are random but
small, so sampling produces finite (meaningless) images.

The pieces other checkpoint scripts share live here too (sdxl_checkpoint.py imports them): ComfyUI on
the CPU, the small random fill, the SD KL-f8 VAE, the write-check-rename of the file, the command line,
and ``cached_checkpoint``, which the fixtures use to build a file once per recipe version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Bumped whenever the recipe changes, so stale cached files get rebuilt.
RECIPE_VERSION = "1"
RECIPE_METADATA_KEY = "x2i_test_recipe"
# Generous: a cold build, load check included, takes well under a minute on a 2-core CPU.
BUILD_TIMEOUT_S = 900

log = logging.getLogger("x2i.tests.sd15_checkpoint")

# The U-Net config ComfyUI's model detection produces for a real SD1.5 checkpoint: sd15_unet.py's, shared with
# the in-process node tests (a sibling module when this file runs as a script).
try:
    from .sd15_unet import SD15_UNET
except ImportError:
    from sd15_unet import SD15_UNET

# The SD1.x KL-f8 VAE (same ddconfig comfy/sd.py uses for such state dicts); SDXL's VAE has the same one.
SD15_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

# OpenAI CLIP ViT-L/14 text tower, as used by SD1.5.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def import_comfy_on_cpu(comfyui_path: Path) -> None:
    """Put ComfyUI on sys.path and force CPU before model_management is imported."""
    sys.path.insert(0, str(comfyui_path))
    import comfy.cli_args  # noqa: PLC0415 - must precede comfy.model_management

    comfy.cli_args.args.cpu = True


def fill_small_random(module: Any, generator: Any) -> None:
    """Give every parameter a deterministic, well-scaled value.

    ComfyUI's constructors skip weight initialisation (``disable_weight_init``
    ops), so without this the tensors hold uninitialised memory and sampling
    yields NaN/inf.
    """
    import torch  # noqa: PLC0415

    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for submodule in module.modules():
            for name, param in submodule.named_parameters(recurse=False):
                if isinstance(submodule, norm_types) and name == "weight":
                    param.fill_(1.0)
                elif name == "bias":
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02, generator=generator)


def prefixed_fp16(module: Any, prefix: str) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    return {
        prefix + key: tensor.to(torch.float16).contiguous()
        for key, tensor in module.state_dict().items()
        if tensor.is_floating_point()
    }


def _build_unet(generator: Any) -> dict[str, Any]:
    import comfy.model_detection  # noqa: PLC0415
    import torch  # noqa: PLC0415

    unet_config = dict(SD15_UNET, dtype=torch.float32)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError("ComfyUI did not recognise the SD1.5 U-Net config")
    unet = model_config.get_model({}).diffusion_model
    fill_small_random(unet, generator)
    return prefixed_fp16(unet, "model.diffusion_model.")


def build_vae(generator: Any) -> dict[str, Any]:
    """The SD KL-f8 VAE (SD1.x and SDXL alike) under ``first_stage_model.``."""
    from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: PLC0415

    vae = AutoencoderKL(ddconfig=SD15_VAE_DDCONFIG, embed_dim=4)
    fill_small_random(vae, generator)
    return prefixed_fp16(vae, "first_stage_model.")


def _build_clip_text(generator: Any) -> dict[str, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    fill_small_random(clip, generator)
    return prefixed_fp16(clip, "cond_stage_model.transformer.")


def build_components(builders: Iterable[Callable[[Any], dict[str, Any]]], seed: int = 0) -> dict[str, Any]:
    """The fp16 state dicts of ``builders``, in order, all drawing from one generator seeded with ``seed``."""
    import torch  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, Any] = {}
    # One component at a time so only one fp32 model is alive at once.
    for build in builders:
        started = time.perf_counter()
        state_dict.update(build(generator))
        log.info("%s done in %.1f s", build.__name__, time.perf_counter() - started)
    return state_dict


def build_state_dict(seed: int = 0) -> dict[str, Any]:
    return build_components((_build_unet, build_vae, _build_clip_text), seed)


def check_loads_as_sd15(path: Path) -> None:
    """Fail unless ComfyUI's own loader sees MODEL, CLIP and VAE of an SD1.5 checkpoint."""
    import comfy.sd  # noqa: PLC0415
    import comfy.supported_models  # noqa: PLC0415

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    model_config = model.model.model_config
    if type(model_config) is not comfy.supported_models.SD15:
        raise RuntimeError(f"checkpoint detected as {type(model_config).__name__}, not SD15")
    if clip is None or vae is None:
        raise RuntimeError("checkpoint is missing its CLIP or VAE part")


def write_checkpoint(
    out: Path,
    build: Callable[[], dict[str, Any]] = build_state_dict,
    check: Callable[[Path], None] = check_loads_as_sd15,
    recipe_version: str = RECIPE_VERSION,
) -> None:
    """``build()`` saved to ``out`` (tagged with ``recipe_version``) once ``check`` accepts the written file."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out.parent.mkdir(parents=True, exist_ok=True)
    # Unique temp name in the target dir: os.replace is atomic only within a filesystem,
    # and concurrent builders must not clobber each other's partial files. It keeps the
    # .safetensors suffix because comfy.utils.load_torch_file picks its reader by suffix.
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        state_dict = build()
        save_file(state_dict, str(tmp), metadata={RECIPE_METADATA_KEY: recipe_version})
        del state_dict
        check(tmp)
        tmp.chmod(0o644)  # safetensors writes 0600; a shared cache should stay readable
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def run_script(argv: list[str] | None, description: str, write: Callable[[Path], None]) -> int:
    """The command line of a checkpoint script: ``--comfyui DIR --out FILE``, then ``write(out)`` on the CPU."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI checkout")
    parser.add_argument("--out", type=Path, required=True, help="target .safetensors path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    import_comfy_on_cpu(args.comfyui.resolve())
    write(args.out)
    log.info("wrote %s in %.1f s", args.out, time.perf_counter() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script(argv, __doc__.splitlines()[0], write_checkpoint)


# ------------------------------------------------------------------ the cache (used in the pytest process)


def cache_dir() -> Path:
    return Path(os.environ.get("X2I_TEST_CACHE", "~/.cache/x2i-tests")).expanduser()


def safetensors_header(path: Path) -> dict[str, Any]:
    """Read the JSON header only (8-byte little-endian length, then JSON): no torch needed. Maps each key
    to its ``dtype``, ``shape`` and ``data_offsets``, and ``__metadata__`` to the metadata, if any."""
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(header_len))


def safetensors_metadata(path: Path) -> dict[str, str]:
    return safetensors_header(path).get("__metadata__", {}) or {}


def is_current_build(path: Path, recipe_version: str) -> bool:
    try:
        return safetensors_metadata(path).get(RECIPE_METADATA_KEY) == recipe_version
    except (OSError, ValueError):
        return False


def cached_checkpoint(
    script: Path, name: str, recipe_version: str, comfyui_path: Path, timeout_s: float = BUILD_TIMEOUT_S
) -> Path:
    """``cache_dir() / name``, built by running the checkpoint ``script`` in a subprocess unless the cached
    file was made by ``recipe_version``. Raises RuntimeError (with the build's stderr) if the build fails."""
    target = cache_dir() / name
    if is_current_build(target, recipe_version):
        return target
    log.info("building %s (about a minute)", target)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(script), "--comfyui", str(comfyui_path), "--out", str(target)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building {target.name} with {script.name} failed:\n{result.stderr[-6000:]}")
    log.info("built %s in %.1f s", target, time.perf_counter() - started)
    return target


if __name__ == "__main__":
    sys.exit(main())
