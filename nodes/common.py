"""What every X2I node shares with ComfyUI: model folders, custom types, device and dtype policy."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io
from torch import nn

logger = logging.getLogger(__name__)

CATEGORY = "X2I"

# Custom types: their names are part of saved workflows.
X2IEncoder = io.Custom("X2I_ENCODER")
GlueNetType = io.Custom("GLUENET")
PointCloudType = io.Custom("POINT_CLOUD")

TEXT_ENCODER_FOLDERS = ("text_encoders", "x2i_text_encoders")
GLUENET_FOLDER = "gluenet"
GLUENET_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")

DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_model_folder(name: str, extensions: Iterable[str]) -> None:
    """Add ``models/<name>`` to ComfyUI's search paths, keeping paths from extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, name)
    paths, known_extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
    paths = list(paths) + ([default] if default not in paths else [])
    folder_paths.folder_names_and_paths[name] = (paths, set(known_extensions) | set(extensions))


def model_folder_paths(names: Iterable[str]) -> list[str]:
    return [path for name in names for path in folder_paths.get_folder_paths(name)]


def resolve_encoder_folder(relative_name: str) -> str:
    """Absolute path of an encoder folder listed by :func:`encoders.list_encoder_folders`."""
    for root in model_folder_paths(TEXT_ENCODER_FOLDERS):
        candidate = os.path.join(root, relative_name)
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(
        f"text encoder folder '{relative_name}' not found in {', '.join(TEXT_ENCODER_FOLDERS)} "
        "(put Hugging Face model folders in ComfyUI/models/text_encoders)"
    )


def encoder_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype to run a transformers encoder in: ComfyUI's choice, but never half precision on CPU."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {choice!r}")
    on_cpu = mm.is_device_cpu(device)
    if choice == "auto":
        if on_cpu:
            return torch.float32
        dtype = mm.text_encoder_dtype(device)
        # fp8 text-encoder flags target ComfyUI's own cast-on-the-fly ops; HF models need a real dtype.
        return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
    dtype = _DTYPES[choice]
    if on_cpu and dtype == torch.float16:
        logger.warning("fp16 is slow or unsupported on CPU; running the encoder in fp32 instead")
        return torch.float32
    return dtype


def encoder_patcher(module: nn.Module) -> comfy.model_patcher.ModelPatcher:
    """Let ComfyUI's model management place ``module`` (an encoder or a GlueNet) like its own text encoders."""
    return comfy.model_patcher.ModelPatcher(
        module, load_device=mm.text_encoder_device(), offload_device=mm.text_encoder_offload_device()
    )


@dataclass(frozen=True)
class LoadedGlueNet:
    """The GLUENET value: a managed GlueNet plus the language it was tagged with in the graph."""

    patcher: comfy.model_patcher.ModelPatcher
    name: str
    language: str | None


def to_conditioning(tokens: torch.Tensor) -> list:
    """Wrap ``[B, T, C]`` embeddings the way CLIPTextEncode does, on ComfyUI's intermediate device."""
    return [[tokens.to(device=mm.intermediate_device(), dtype=torch.float32), {}]]


def translate_to_conditioning(encoder, gluenet: LoadedGlueNet, encode: Callable[[], torch.Tensor]) -> list:
    """Load the encoder and the GlueNet where ComfyUI wants them, encode, translate, wrap.

    ``encode`` runs after loading, so it sees both models on their load device.
    """
    mm.throw_exception_if_processing_interrupted()
    mm.load_models_gpu([encoder, gluenet.patcher])
    features = encode()
    return to_conditioning(gluenet.patcher.model.translate(features, f"encoder '{encoder.model.name}'"))


def encoder_with(encoder, method: str, loader: str) -> nn.Module:
    """The encoder module behind an ``X2I_ENCODER`` if it has ``method``, else a message naming the loader."""
    module = encoder.model
    if not hasattr(module, method):
        raise ValueError(f"'{getattr(module, 'name', 'this encoder')}' cannot {method.replace('_', ' ')}: load one with {loader}")
    return module


def single_gluenet(gluenet) -> LoadedGlueNet:
    """Sound and point clouds have no language: a router there is a wiring mistake worth naming."""
    if not isinstance(gluenet, LoadedGlueNet):
        raise ValueError("the GlueNet Router chooses by language and is for text: connect an X2I GlueNet Loader here")
    return gluenet
