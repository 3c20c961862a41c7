"""What every X2I node shares with ComfyUI: model folders, custom types, device and dtype policy.

The nodes use ComfyUI's versioned node API ``comfy_api.v0_0_2`` (the newest ComfyUI 0.3.64 offers), not
``comfy_api.latest``, which ComfyUI documents as changing without notice."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import comfy.hooks
import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.v0_0_2 import io
from torch import nn

from ..errors import X2IError, X2IFileNotFoundError
from ..families import FAMILIES, SDXL_SIZE_CONDITIONING, Family, family_of_unet
from ..paths import find_in_folders
from ..weights import DTYPES as _DTYPES

logger = logging.getLogger(__name__)

CATEGORY = "X2I"

# Custom types: their names are part of saved workflows.
X2IEncoder = io.Custom("X2I_ENCODER")
GlueNetType = io.Custom("GLUENET")
PointCloudType = io.Custom("POINT_CLOUD")

# Hugging Face folders go in models/x2i_text_encoders, where core loaders (Load CLIP lists text_encoders file by
# file) never offer their shards; models/text_encoders is read too, after it, for folders already there.
TEXT_ENCODER_FOLDERS = ("x2i_text_encoders", "text_encoders")
GLUENET_FOLDER = "gluenet"
GLUENET_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")

DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")

# Tooltips of inputs and outputs that several nodes share (the locales/ translate them by node).
DTYPE_TOOLTIP = "auto: ComfyUI's text-encoder precision on GPU, fp32 on CPU."
ENCODER_INPUT_TOOLTIP = "The encoder from the matching X2I loader; its features must have the width the GlueNet expects."
GLUENET_INPUT_TOOLTIP = "A GlueNet from X2I GlueNet Loader or Router, trained for this encoder."
ENCODER_OUTPUT_TOOLTIP = "The loaded encoder, managed by ComfyUI's model management; connect it to an X2I encode node."
GLUENET_OUTPUT_TOOLTIP = "The GlueNet, for X2I GlueGen encode nodes or the GlueNet Router."
CONDITIONING_OUTPUT_TOOLTIP = ("Conditioning for the model family the GlueNet was made for (SD1.x: 77 tokens × 768; SDXL: 77 × 2048 "
                               "plus the pooled vector and 1024² size conditioning), for KSampler's positive or negative.")


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
    path = find_in_folders(model_folder_paths(TEXT_ENCODER_FOLDERS), relative_name,
                           lambda candidate: os.path.isfile(os.path.join(candidate, "config.json")))
    if path is None:
        raise X2IFileNotFoundError(
            f"text encoder folder '{relative_name}' not found in {', '.join(TEXT_ENCODER_FOLDERS)} "
            "(put Hugging Face model folders in ComfyUI/models/x2i_text_encoders)"
        )
    return path


def schema_problem(node: type[io.ComfyNode], values: dict, choices: bool = False) -> str | None:
    """What is wrong with a node's widget values against its own schema: a number outside its min/max or
    a combo value that is not text; with ``choices``, a combo value not among its options. ComfyUI 0.3.64
    checks none of this for a V3 node with ``validate_inputs`` (nor combo options of any V3 node), so every
    X2I node does it here. Linked inputs (``None`` while validating) are left to the node."""
    for spec in node.define_schema().inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        if isinstance(spec, io.Combo.Input) and spec.options is not None:
            if not isinstance(value, type(spec.options[0]) if spec.options else str):
                return f"{spec.id} must be one of the choices, got {type(value).__name__} {str(value)[:50]!r}"
            if choices and value not in spec.options:
                shown = ", ".join(map(str, spec.options[:8])) + (", ..." if len(spec.options) > 8 else "")
                return f"{spec.id}: {str(value)[:200]!r} is not one of the choices ({shown or 'none installed'})"
        if isinstance(spec, (io.Int.Input, io.Float.Input)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                return f"{spec.id} must be a number, got {str(value)[:50]!r}"
            if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
                return f"{spec.id} must be from {spec.min} to {spec.max}, got {value}"
    return None


def require_valid(node: type[io.ComfyNode], **values) -> None:
    """:func:`schema_problem` while executing, for values that came through links and skipped validation."""
    problem = schema_problem(node, values)
    if problem:
        raise X2IError(problem)


class X2INode(io.ComfyNode):
    """Base of every X2I node: before the graph runs, widget values are checked against the schema
    (:func:`schema_problem`: numbers, types), then by the node's own :meth:`check_inputs` (a file that
    must exist and be what it claims, with a message saying what it is), then against the combo choices."""

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return schema_problem(cls, values) or cls.check_inputs(**values) or schema_problem(cls, values, choices=True) or True

    @classmethod
    def check_inputs(cls, **values) -> str | None:
        return None


def encoder_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype to run a transformers encoder in: ComfyUI's choice, but never half precision on CPU."""
    if choice not in DTYPE_CHOICES:
        raise X2IError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {choice!r}")
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


def load_fully(patchers: list[comfy.model_patcher.ModelPatcher]) -> None:
    """Load plain PyTorch / Hugging Face modules (encoders, GlueNets, adapters, language models) onto their
    load device whole, as ComfyUI loads its own text encoders (``force_full_load``). Their layers have no
    cast-on-the-fly weights, so a partial load (short VRAM) would leave the rest on the offload device:
    a forward across two devices, and LoRA patches of the layers left behind silently not applied."""
    mm.load_models_gpu(patchers, force_full_load=True)


@dataclass(frozen=True)
class LoadedGlueNet:
    """The GLUENET value: a managed GlueNet plus the language it was tagged with in the graph."""

    patcher: comfy.model_patcher.ModelPatcher
    name: str
    language: str | None


def model_family(model: comfy.model_patcher.ModelPatcher) -> tuple[Family | None, str]:
    """The family whose conditioning a ComfyUI MODEL reads (None: one the pack makes none for) and its name as
    ComfyUI detected it (``SDXL``, ``Segmind_Vega``, ``SD15`` ...)."""
    config = getattr(model.model, "model_config", None)
    unet = getattr(config, "unet_config", None) or {}
    name = type(config).__name__ if config is not None else type(model.model).__name__
    return family_of_unet(unet.get("context_dim"), unet.get("adm_in_channels")), name


def check_model_family(model: comfy.model_patcher.ModelPatcher, expected: Family, made: str) -> None:
    """Refuse ``made`` (what was made for ``expected``) on a model of a family the pack makes conditioning for
    that is another one, naming both. A model of no such family (U-ViT, PixArt ...) is left to its own checks."""
    actual, name = model_family(model)
    if actual is not None and actual != expected:
        raise X2IError(
            f"{made} is for {expected.name} ({expected.token_width}-wide tokens"
            f"{f' + {expected.pooled_dim}-wide pooled' if expected.pooled_dim else ''}), but the model is {name}, an "
            f"{actual.name} model ({actual.token_width}-wide{f' + {actual.pooled_dim}-wide pooled' if actual.pooled_dim else ''}): "
            f"use one made for {actual.name}, or an {expected.name} checkpoint"
        )


class FamilyCheck(comfy.hooks.AdditionalModelsHook):
    """Refuses X2I conditioning on a model of another family when sampling starts, naming both, instead of a
    matrix-shape error deep in the U-Net.

    ComfyUI shows a conditioning to its model only inside the sampler; a conditioning hook is the one place it
    offers that sees both (``prepare_model_patcher`` calls ``add_hook_patches`` with the model). It registers
    nothing and adds no model or weight patch. All X2I conditioning of one family shares one :class:`HookGroup`
    (:data:`FAMILY_HOOKS`): ComfyUI batches conditionings by hook group, so an X2I positive and negative still
    run in one batch (next to a core-encoded conditioning they run as two)."""

    def __init__(self, family_key: str = "sd1") -> None:
        super().__init__(models=[], key=f"x2i.family.{family_key}")
        self.family_key = family_key

    def clone(self) -> FamilyCheck:
        copy = super().clone()
        copy.family_key = self.family_key
        return copy

    def add_hook_patches(self, model, model_options, target_dict, registered) -> bool:
        check_model_family(model, FAMILIES[self.family_key], "This X2I conditioning (from a GlueNet or a LaVi-Bridge)")
        return False


def _family_hooks(key: str) -> comfy.hooks.HookGroup:
    group = comfy.hooks.HookGroup()
    group.add(FamilyCheck(key))
    return group


FAMILY_HOOKS: dict[str, comfy.hooks.HookGroup] = {key: _family_hooks(key) for key in FAMILIES}


def to_conditioning(tokens: torch.Tensor, pooled: torch.Tensor | None = None, family: Family | None = None) -> list:
    """Wrap ``[B, T, C]`` embeddings the way CLIPTextEncode does, on ComfyUI's intermediate device; with a pooled
    ``[B, P]`` vector, as CLIPTextEncodeSDXL does (its default 1024² size conditioning). ``family``: checked
    against the model when sampling starts (:class:`FamilyCheck`)."""
    device = mm.intermediate_device()
    options: dict = {}
    if pooled is not None:
        options.update(pooled_output=pooled.to(device=device, dtype=torch.float32), **SDXL_SIZE_CONDITIONING)
    if family is not None:
        options["hooks"] = FAMILY_HOOKS[family.key]
    return [[tokens.to(device=device, dtype=torch.float32), options]]


def translate_to_conditioning(encoder, gluenet: LoadedGlueNet, encode: Callable[[], torch.Tensor]) -> list:
    """Load the encoder and the GlueNet where ComfyUI wants them, encode, translate, wrap (with the pooled
    vector and size conditioning of an SDXL GlueNet).

    ``encode`` runs after loading, so it sees both models on their load device.
    """
    mm.throw_exception_if_processing_interrupted()
    load_fully([encoder, gluenet.patcher])
    features = encode()
    translator = gluenet.patcher.model
    tokens, pooled = translator.translate_with_pooled(features, f"encoder '{encoder.model.name}'")
    return to_conditioning(tokens, pooled, translator.config.family)


def encoder_with(encoder, method: str, loader: str) -> nn.Module:
    """The encoder module behind an ``X2I_ENCODER`` if it has ``method``, else a message naming the loader."""
    module = encoder.model
    if not hasattr(module, method):
        raise X2IError(f"'{getattr(module, 'name', 'this encoder')}' cannot {method.replace('_', ' ')}: load one with {loader}")
    return module


def embedding_encoder_and_gluenet(encoder, gluenet, method: str, loader: str) -> tuple[nn.Module, LoadedGlueNet]:
    """For sound and point clouds: the encoder module (if it can ``method``) and the GlueNet, checked to fit its
    embedding. They have no language, so a router there is a wiring mistake worth naming."""
    module = encoder_with(encoder, method, loader)
    if not isinstance(gluenet, LoadedGlueNet):
        raise X2IError("the GlueNet Router chooses by language and is for text: connect an X2I GlueNet Loader here")
    gluenet.patcher.model.check_embedding(module.output_dim, f"encoder '{module.name}'")
    return module, gluenet
