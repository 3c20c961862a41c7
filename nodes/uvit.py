"""U-ViT as a ComfyUI MODEL: stock KSampler, every sampler and scheduler, CLIPTextEncode for the text.

The network is built by ComfyUI's own ``BaseModel`` from a ``model_config`` describing it, so
ComfyUI's operations (manual casting, fp8), dtype choice, device placement and memory management
apply as to any core model. What differs from SD1.x is stated in :class:`UViTModelConfig` and
:class:`UViTBaseModel`: the latent scale (0.23010), the timestep offset (U-ViT counts 1..1000 where
ComfyUI's discrete models count 0..999), and a text context of exactly one CLIP chunk.
"""

from __future__ import annotations

import logging
import os

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models_base
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..errors import X2IError
from ..paths import disk_state
from ..uvit import SamplingConvention, UViT, UViTConfig, UViTFileError, load_uvit_state_dict, probe_uvit_file
from ..uvit.model import fit_text_context
from .common import CATEGORY, X2INode

logger = logging.getLogger(__name__)

UVIT_FOLDER = "diffusion_models"
# UNETLoader's choices, with the same meaning.
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


class UViTLatentFormat(comfy.latent_formats.SD15):
    """SD's KL-f8 latents (same channels, previews and TAESD) at U-ViT's MS-COCO scale."""

    def __init__(self, scale_factor: float = SamplingConvention.latent_scale) -> None:
        super().__init__(scale_factor)


class UViTModelConfig(comfy.supported_models_base.BASE):
    """What ComfyUI needs to know to build and sample a U-ViT; built from the file, never detected."""

    unet_config: dict = {}
    unet_extra_config: dict = {}  # no num_heads / num_head_channels: the U-ViT config is complete
    latent_format = UViTLatentFormat
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def __init__(self, config: UViTConfig, sampling: SamplingConvention) -> None:
        if sampling.prediction != "eps":
            raise UViTFileError(f"this U-ViT predicts {sampling.prediction!r}; only ε-prediction ('eps') U-ViTs sample here")
        super().__init__(config.to_dict())
        self.uvit = config
        self.sampling = sampling
        self.latent_format = UViTLatentFormat(sampling.latent_scale)
        self.sampling_settings = {
            "beta_schedule": sampling.beta_schedule,
            "linear_start": sampling.linear_start,
            "linear_end": sampling.linear_end,
            "timesteps": sampling.num_timesteps,
        }

    def inpaint_model(self) -> bool:
        return False

    def get_model(self, state_dict=None, prefix: str = "", device=None) -> UViTBaseModel:
        return UViTBaseModel(self, device=device)


class UViTBaseModel(comfy.model_base.BaseModel):
    """ComfyUI's BaseModel with U-ViT as its diffusion model (ε-prediction, discrete schedule)."""

    def __init__(self, model_config: UViTModelConfig, device=None) -> None:
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device, unet_model=UViT)
        self.timestep_offset = model_config.sampling.timestep_offset

    def process_timestep(self, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        # ModelSamplingDiscrete gives the index 0..999 of the sigma; U-ViT numbers the same times 1..1000.
        return timestep + self.timestep_offset

    def extra_conds(self, **kwargs):
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            kwargs["cross_attn"] = fit_text_context(cross_attn, self.model_config.uvit)
        return super().extra_conds(**kwargs)


def _model_options(weight_dtype: str) -> dict:
    if weight_dtype not in WEIGHT_DTYPES:
        raise X2IError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    options: dict = {}
    if weight_dtype.startswith("fp8_e4m3fn"):
        options["dtype"] = torch.float8_e4m3fn
        options["fp8_optimizations"] = weight_dtype.endswith("_fast")
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    return options


def load_uvit_model(path: str | os.PathLike[str], weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """A U-ViT file (any supported layout) as a ComfyUI MODEL, the way ``comfy.sd.load_diffusion_model``
    builds a core one: ComfyUI picks the dtype and the operations, places and manages the weights."""
    options = _model_options(weight_dtype)
    loaded = load_uvit_state_dict(path)  # strict: every key and shape checked, UViTFileError otherwise
    state_dict = dict(loaded.state_dict)
    model_config = UViTModelConfig(loaded.config, loaded.sampling)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    dtype = options.get("dtype") or mm.unet_dtype(
        model_params=comfy.utils.calculate_parameters(state_dict),
        supported_dtypes=model_config.supported_inference_dtypes,
        weight_dtype=comfy.utils.weight_dtype(state_dict),
    )
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes))
    if options.get("fp8_optimizations"):
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(state_dict).to(offload_device)
    model.load_model_weights(state_dict, "")
    logger.info(
        "U-ViT %s: %s, %d×%d latents, %s layout", os.path.basename(path), loaded.config.name,
        loaded.config.image_size, loaded.config.image_size, loaded.layout,
    )
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class X2IUViTLoader(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IUViTLoader",
            display_name="X2I U-ViT Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a text-to-image U-ViT (intermediate or early fusion) from models/diffusion_models as a "
            "MODEL for KSampler: this pack's .safetensors, the intermediate-fusion authors' .pth or U-ViT's .pth. "
            "Text: Load CLIP (clip_l, stable_diffusion) + CLIP Text Encode; VAE: SD's KL-f8; size: the model's "
            "(256×256 for the MS-COCO models).",
            inputs=[
                io.Combo.Input(
                    "uvit_name",
                    options=folder_paths.get_filename_list(UVIT_FOLDER),
                    tooltip="U-ViT file in models/diffusion_models.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(WEIGHT_DTYPES),
                    default="default",
                    tooltip="As in Load Diffusion Model: default lets ComfyUI choose; fp8 stores the weights in 8 bits.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The U-ViT as a MODEL for KSampler; text from CLIP Text Encode with clip_l.")],
        )

    @classmethod
    def check_inputs(cls, uvit_name: str, **_) -> str | None:
        path = folder_paths.get_full_path(UVIT_FOLDER, uvit_name)
        if path is None:
            return f"U-ViT file '{uvit_name}' not found in models/{UVIT_FOLDER}"
        if path.lower().endswith(".safetensors"):  # a header read; .pth files are checked when loaded
            try:
                probe_uvit_file(path)
            except UViTFileError as exc:
                return str(exc)
        return None

    @classmethod
    def fingerprint_inputs(cls, uvit_name: str, **_) -> tuple | None:
        return disk_state(folder_paths.get_full_path(UVIT_FOLDER, uvit_name))

    @classmethod
    def execute(cls, uvit_name: str, weight_dtype: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(UVIT_FOLDER, uvit_name)
        return io.NodeOutput(load_uvit_model(path, weight_dtype))
