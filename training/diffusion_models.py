"""The frozen diffusion models a LaVi-Bridge trains against: SD1.x and SDXL U-Nets and PixArt transformers,
with their VAE and noise schedule, loaded offline through diffusers.

- **SD1.x from a single file** (``v1-5-pruned-emaonly.safetensors``, the original LDM key layout): the
  U-Net and VAE are converted with diffusers' own ``convert_ldm_unet_checkpoint`` /
  ``convert_ldm_vae_checkpoint`` against the explicit SD1 configs below (nothing is downloaded), after
  checking the file really is SD1.x (an SDXL, SD2.x or inpainting file is named as such).
- **SDXL from a single file** (``sd_xl_base_1.0.safetensors``, the original SGM layout: ``model.diffusion_model.*``,
  ``first_stage_model.*``, ``conditioner.embedders.*``, the last never read): converted the same way against
  SDXL's configs. The U-Net's config is read from the file's shapes (:func:`sdxl_unet_config_from_shapes`), so an
  SDXL-family U-Net with fewer transformer blocks per level than the base loads as what it is; a refiner, an
  SD1.x / SD2.x file or one without a U-Net is refused, saying what it is.
- **SD1.x, SDXL or PixArt from a diffusers folder** (``unet/`` or ``transformer/``, ``vae/``, optional
  ``scheduler/``); a ``unet/config.json`` with ``addition_embed_type: "text_time"`` is SDXL.

Training objective (the official one): DDPM noise schedule (SD1: ``scaled_linear`` 0.00085–0.012, 1000
steps; PixArt: its own ``linear`` 0.0001–0.02), latents × the VAE's scaling factor (0.18215), uniform
``t`` in [0, 1000), MSE against ε. PixArt predicts ε and a learned variance: the ε half is taken.
SDXL is trained like SD1.x: its base was trained with the same schedule (``scaled_linear`` 0.00085–0.012, 1000
steps: the numbers of SD1's), ε-prediction, latents × 0.13025; its U-Net also reads a pooled text vector and
six size numbers (``added_cond_kwargs``: the bridge's pooled head, :meth:`.image_data.CropGeometry.time_ids`).
SDXL's VAE runs in float32 whatever the U-Net's dtype (it overflows in fp16: ``force_upcast``), unless its
config says it does not need to (``force_upcast: false``, as the fp16-fixed VAE).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..bridge.lora import LoraTarget, UNetStructure, pixart_lora_targets, unet_lora_targets
from ..errors import X2IError
from ..weights import (
    TORCH_PICKLE_SUFFIXES,
    describe_keys,
    read_torch_checkpoint,
    state_dict_mismatch,
    unwrap_state_dict,
)

logger = logging.getLogger(__name__)

DiffusionKind = Literal["sd1", "pixart", "sdxl"]

# diffusers config.json of SD1.5's U-Net (runwayml/stable-diffusion-v1-5, unet/); SD1.4 is identical.
SD1_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# diffusers config.json of SD1.5's VAE (vae/): the KL-f8 autoencoder.
SD1_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
# diffusers config.json of SDXL base 1.0's U-Net (stabilityai/stable-diffusion-xl-base-1.0, unet/): pooled text
# and six size numbers enter through add_embedding ("text_time": 1280 + 6 x 256 = 2816).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# SDXL's VAE (vae/): SD1's KL-f8 architecture with its own latent scale.
SDXL_VAE_CONFIG: dict[str, Any] = {**SD1_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# The training schedules (SD1.x's scheduler_config; PixArt-alpha's).
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "clip_sample": False},
    "pixart": {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "prediction_type": "epsilon", "clip_sample": False},
}
# SDXL base 1.0's scheduler_config has SD1's numbers: scaled_linear 0.00085-0.012, 1000 steps, ε-prediction.
SCHEDULER_CONFIGS["sdxl"] = dict(SCHEDULER_CONFIGS["sd1"])
# SDXL's pooled text vector (OpenCLIP bigG's projected end token) and the width of its attention heads.
SDXL_POOLED_DIM = 1280
SDXL_HEAD_CHANNELS = 64
SDXL_CONTEXT_DIM = 2048
# An SDXL refiner: OpenCLIP bigG alone (1280) and 1280 + 5 x 256 = 2560 (sizes and an aesthetic score).
SDXL_REFINER = {"context": 1280, "adm": 2560}
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
SINGLE_FILE_SUFFIXES = (".safetensors", *TORCH_PICKLE_SUFFIXES)
# An SD1.x file's first cross-attention key projection: [320, context width].
_ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_CONV_IN = "input_blocks.0.0.weight"
# SDXL's add_embedding.linear_1 in the SGM layout: [time embedding width, ADM input].
_ADM = "label_emb.0.0.weight"


class DiffusionModelError(X2IError):
    """A diffusion-model file or folder the bridge trainer cannot use; the message says why and what to do."""


def _diffusers():
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DiffusionModelError(
            "the bridge trainer needs diffusers (pip install diffusers): it loads the U-Net, PixArt and VAE with it"
        ) from exc
    return diffusers


@dataclass
class DiffusionModel:
    """A frozen denoiser with its VAE and training noise schedule."""

    kind: DiffusionKind
    denoiser: nn.Module
    vae: nn.Module | None
    scheduler: Any
    scaling_factor: float
    context_dim: int
    name: str

    def lora_targets(self) -> list[LoraTarget]:
        """The vision LoRA layers in the official positional order (checked against this model)."""
        config = self.denoiser.config
        if self.kind in ("sd1", "sdxl"):
            targets = unet_lora_targets(UNetStructure.from_config(dict(config)))
        else:
            targets = pixart_lora_targets(config.num_layers, config.num_attention_heads * config.attention_head_dim)
        check_targets(self.denoiser, targets, self.name)
        return targets

    @property
    def learned_sigma(self) -> bool:
        config = self.denoiser.config
        return self.kind == "pixart" and config.out_channels == 2 * config.in_channels

    @property
    def pooled_dim(self) -> int:
        """The width of the pooled text vector the denoiser reads (SDXL: 1280), 0 for SD1.x and PixArt."""
        if self.kind != "sdxl":
            return 0
        config = self.denoiser.config
        return int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)

    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
        denoiser: nn.Module | None = None, pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε prediction of ``denoiser`` (default: the frozen one; pass the LoRA-injected module). SDXL also takes
        the pooled text vector ``[B, 1280]`` and the size numbers ``time_ids`` ``[B, 6]``."""
        denoiser = denoiser if denoiser is not None else self.denoiser
        if self.kind == "sd1":
            return denoiser(noisy, timesteps, encoder_hidden_states=context).sample
        if self.kind == "sdxl":
            if pooled is None or time_ids is None:
                raise DiffusionModelError("an SDXL U-Net needs the pooled text vector and the time_ids (original size, crop, target size)")
            added = {"text_embeds": pooled, "time_ids": time_ids}
            return denoiser(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        added = {"resolution": None, "aspect_ratio": None}
        if self.denoiser.config.use_additional_conditions:
            # PixArt-alpha 1024: the pixel resolution and aspect ratio, as its pipeline passes them.
            batch, _, h, w = noisy.shape
            height, width = h * 8, w * 8
            added = {
                "resolution": torch.tensor([height, width], device=noisy.device, dtype=context.dtype).repeat(batch, 1),
                "aspect_ratio": torch.tensor([height / width], device=noisy.device, dtype=context.dtype).repeat(batch, 1),
            }
        out = denoiser(noisy, encoder_hidden_states=context, timestep=timesteps, encoder_attention_mask=mask,
                       added_cond_kwargs=added).sample
        return out.chunk(2, dim=1)[0] if self.learned_sigma else out


def check_targets(model: nn.Module, targets: list[LoraTarget], source: str) -> None:
    """Every LoRA target exists in ``model`` as the Linear / Conv2d of the expected shape."""
    modules = dict(model.named_modules())
    for target in targets:
        module = modules.get(target.name)
        if module is None:
            raise DiffusionModelError(f"{source}: the LoRA layer {target.name} does not exist in this model; it is not the model the recipe is for")
        kind = "linear" if isinstance(module, nn.Linear) else "conv" if isinstance(module, nn.Conv2d) else type(module).__name__
        if kind != target.kind or tuple(module.weight.shape) != target.weight_shape:
            raise DiffusionModelError(
                f"{source}: layer {target.name} is a {kind} {list(module.weight.shape)}, the recipe expects a "
                f"{target.kind} {list(target.weight_shape)}"
            )


def make_scheduler(kind: DiffusionKind, folder: Path | None = None):
    """diffusers' ``DDPMScheduler``: the folder's ``scheduler/`` config when there is one, else the kind's own."""
    diffusers = _diffusers()
    config_file = folder / "scheduler" / "scheduler_config.json" if folder else None
    if config_file is not None and config_file.is_file():
        scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    else:
        scheduler = diffusers.DDPMScheduler(**SCHEDULER_CONFIGS[kind])
    if scheduler.config.prediction_type != "epsilon":
        raise DiffusionModelError(
            f"the scheduler predicts {scheduler.config.prediction_type!r}; LaVi-Bridge trains ε-prediction models "
            "(SD1.x, SDXL, PixArt-alpha), not v-prediction (SD2.x 768)"
        )
    return scheduler


# ---------------------------------------------------------------------------------------------------
# Loading


def detect_kind(path: str | os.PathLike[str]) -> DiffusionKind:
    """``sdxl`` for a single file whose U-Net has SDXL's pooled-text/size embedding (``label_emb``) and an SDXL text
    context, or a folder whose ``unet/config.json`` says ``addition_embed_type: "text_time"``; ``sd1`` for any
    other single file or folder with ``unet/`` (the loaders refuse what is not SD1.x, naming it); ``pixart``
    for a folder with ``transformer/``. A single file's header is read, not its weights."""
    path = Path(path)
    if path.is_file():
        shapes = _file_shapes(path)
        unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in shapes.items() if k.startswith(LDM_UNET_PREFIX)}
        sdxl_context = _context_width(unet) in (SDXL_CONTEXT_DIM, SDXL_REFINER["context"])
        return "sdxl" if _ADM in unet and sdxl_context else "sd1"
    if (path / "transformer").is_dir():
        return "pixart"
    if (path / "unet").is_dir():
        config = path / "unet" / "config.json"
        try:
            text_time = json.loads(config.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time"
        except (OSError, ValueError, AttributeError):
            text_time = False  # the loader says what is wrong with it
        return "sdxl" if text_time else "sd1"
    raise DiffusionModelError(
        f"{path} is neither a single-file SD1.x checkpoint nor a diffusers folder with unet/ (SD1.x) or transformer/ "
        "(PixArt) and vae/; SDXL: a single file in the original layout or a diffusers folder"
    )


def check_single_file(path: str | os.PathLike[str], kind: DiffusionKind) -> None:
    """Refuse, saying what it is, a single file that is not a ``kind`` model the trainer can load, from its
    header alone (the checks :func:`load_diffusion_model` makes before converting; for a dry run)."""
    path = Path(path)
    if kind == "pixart":
        raise DiffusionModelError(f"{path.name} is a single file; give PixArt as a diffusers folder (transformer/, vae/)")
    shapes = _file_shapes(path)
    if kind == "sdxl":
        _check_sdxl_file(path.name, list(shapes), shapes)
    else:
        _check_sd1_file(path.name, list(shapes), shapes, SD1_UNET_CONFIG)


def load_diffusion_model(
    path: str | os.PathLike[str],
    kind: Literal["auto", "sd1", "pixart"] = "auto",
    dtype: torch.dtype = torch.float32,
    vae: str | os.PathLike[str] | None = None,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
) -> DiffusionModel:
    """Load a frozen (``requires_grad=False``, eval) denoiser + VAE on the CPU in ``dtype``.

    ``vae``: a VAE to use instead of the checkpoint's own (a single file in the LDM layout such as
    ``vae-ft-mse-840000-ema-pruned.safetensors``, or a diffusers ``vae`` folder). ``unet_config`` /
    ``vae_config``: the diffusers configs single files are converted against (default SD1.5's; for SDXL the
    U-Net's config read from the file's shapes and SDXL's VAE config). An SDXL VAE stays in float32 (see
    the module docstring).

    A single file given with an explicit ``kind`` is checked as that kind, so the refusal names what the
    file is instead (an SD2.x file asked to be SDXL, an SDXL file asked to be SD1.x).
    """
    path = Path(path)
    if not path.exists():
        raise DiffusionModelError(f"diffusion model not found: {path}")
    detected = detect_kind(path)
    wanted = detected if kind == "auto" else kind
    if path.is_file():
        if wanted == "pixart":
            check_single_file(path, "pixart")
        if wanted == "sdxl":
            model = load_sdxl_single_file(path, dtype, unet_config, vae_config or SDXL_VAE_CONFIG, with_vae=vae is None)
        else:
            model = load_sd1_single_file(path, dtype, unet_config or SD1_UNET_CONFIG, vae_config or SD1_VAE_CONFIG, with_vae=vae is None)
    else:
        if wanted != detected:
            raise DiffusionModelError(f"{path.name} looks like a {detected} model, but model.kind says {kind}")
        model = _load_folder(path, detected, dtype, with_vae=vae is None)
    if vae is not None:
        default_config = SDXL_VAE_CONFIG if model.kind == "sdxl" else SD1_VAE_CONFIG
        if model.kind == "sdxl":
            model.vae = _sdxl_vae(load_vae(vae, torch.float32, vae_config or default_config), dtype)
        else:
            model.vae = load_vae(vae, dtype, vae_config or default_config)
        model.scaling_factor = float(model.vae.config.scaling_factor)
    return model


def _sdxl_vae(vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An SDXL VAE loaded in float32, kept there unless its config says fp16 is safe (``force_upcast: false``)."""
    if getattr(vae.config, "force_upcast", True):
        return vae
    return _frozen(vae, dtype)


def _frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def _file_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single file as a meta tensor of its shape: a safetensors file's header alone, a pickle
    memory-mapped where its format allows."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except Exception as exc:
            raise DiffusionModelError(f"{path.name} is not a readable safetensors file ({exc}); it may be truncated") from exc
    tensors, _ = _read_single_file(path, ())
    return {k: torch.empty(v.shape, device="meta") for k, v in tensors.items()}


def _read_single_file(path: Path, prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors under ``prefixes`` (all keys' names too), reading nothing else from a safetensors file."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise DiffusionModelError(f"{path.name}: not a checkpoint file (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                wanted = [k for k in keys if not prefixes or k.startswith(prefixes)]
                return {k: f.get_tensor(k) for k in wanted}, keys
        except Exception as exc:
            raise DiffusionModelError(f"{path.name} is not a readable safetensors file ({exc}); it may be truncated") from exc
    obj = unwrap_state_dict(read_torch_checkpoint(path, DiffusionModelError, "Convert the checkpoint to .safetensors."))
    if not isinstance(obj, Mapping):
        raise DiffusionModelError(f"{path.name} holds a {type(obj).__name__}, not a checkpoint state_dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in tensors.items() if not prefixes or k.startswith(prefixes)}, list(tensors)


def _check_has_unet(name: str, keys: list[str], family: str) -> None:
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return
    if any(k.startswith("down_blocks.") for k in keys):
        what = "a diffusers U-Net weight file: give the whole diffusers folder (unet/, vae/) instead"
    elif any(k.startswith(("blocks.0.attn.qkv", "transformer_blocks.0.attn1")) for k in keys):
        what = "a PixArt transformer: give PixArt as a diffusers folder (transformer/, vae/)"
    elif any(k.startswith(("encoder.down.", "decoder.up.", LDM_VAE_PREFIX + "encoder.down.")) for k in keys):
        what = f"a standalone VAE: set it as model.vae and give the {family} checkpoint as model.diffusion_model"
    else:
        what = f"not a Stable Diffusion checkpoint ({describe_keys(keys)})"
    raise DiffusionModelError(f"{name} has no U-Net ({LDM_UNET_PREFIX}* keys): it is {what}")


def _context_width(unet: Mapping[str, torch.Tensor]) -> int | None:
    """The text context width of an LDM-layout U-Net (prefix removed): its cross-attention key projections' input."""
    widths = {int(v.shape[-1]) for k, v in unet.items() if k.endswith(".attn2.to_k.weight")}
    return widths.pop() if len(widths) == 1 else None


def _what_sdxl_family(context: int | None, adm: int) -> tuple[str, str]:
    """(what an LDM U-Net with an ADM input is, what to do with it)."""
    if context == SDXL_REFINER["context"] or adm == SDXL_REFINER["adm"]:
        return (f"an SDXL refiner (text context {context} wide, ADM input {adm}: OpenCLIP bigG alone and an aesthetic score)",
                "a refiner only denoises the last steps of an SDXL base's images and is prompted through the base; bridge the "
                "SDXL base (sd_xl_base_1.0.safetensors or an SDXL-family base)")
    if context == SDXL_CONTEXT_DIM:
        return "an SDXL checkpoint", 'train it with model.kind = "sdxl" (or "auto")'
    return (f"an SD-style checkpoint with a {context}-wide text context and an ADM input of {adm} (an SD2.x unCLIP or upscaler)",
            "the bridge trainer trains SD1.x, SDXL base and PixArt models")


def _check_sd1_file(name: str, keys: list[str], tensors: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> None:
    _check_has_unet(name, keys, "SD1.x")
    adm = tensors.get(LDM_UNET_PREFIX + _ADM)
    if adm is not None:
        unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(LDM_UNET_PREFIX)}
        what, todo = _what_sdxl_family(_context_width(unet), int(adm.shape[1]))
        raise DiffusionModelError(f"{name} is {what}, not SD1.x: {todo}")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise DiffusionModelError(f"{name} is an SDXL checkpoint (it holds SDXL's text encoders); the bridge trainer trains SD1.x "
                                  'U-Nets with model.kind = "sd1": train an SDXL base with model.kind = "sdxl"')
    attn2 = tensors.get(LDM_UNET_PREFIX + _ATTN2_K)
    context = unet_config.get("cross_attention_dim")
    if attn2 is None:
        raise DiffusionModelError(f"{name} has no {LDM_UNET_PREFIX}{_ATTN2_K}: not an SD1.x U-Net")
    if attn2.shape[-1] != context:
        family = {1024: "an SD2.x", 2048: "an SDXL", 1280: "an SDXL refiner"}.get(int(attn2.shape[-1]), "a non-SD1.x")
        raise DiffusionModelError(
            f"{name} is {family} checkpoint (text context {attn2.shape[-1]} wide, SD1.x has {context}); "
            "the bridge trainer trains SD1.x U-Nets"
        )
    conv_in = tensors.get(LDM_UNET_PREFIX + _CONV_IN)
    if conv_in is not None and conv_in.shape[1] != unet_config.get("in_channels", 4):
        raise DiffusionModelError(
            f"{name}'s U-Net takes {conv_in.shape[1]} input channels (an inpainting or instruct model); "
            "the bridge trainer trains text-to-image SD1.x U-Nets with 4"
        )


def _build_loaded(
    cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], name: str, what: str, dtype: torch.dtype,
    family: str = "SD1.x",
) -> nn.Module:
    """``cls.from_config(config)`` holding exactly ``state`` in ``dtype`` (built on the meta device: no random init)."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = cls.from_config(dict(config))
    details = state_dict_mismatch(model.state_dict(), state)
    if details:
        raise DiffusionModelError(f"{name}: the {what} does not have the {family} layout: {details}")
    model.load_state_dict(dict(state), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # pragma: no cover - a diffusers version with non-persistent buffers
        with torch.device("cpu"):
            model = cls.from_config(dict(config))
        model.load_state_dict(dict(state), strict=True)
    return model


def load_sd1_single_file(
    path: Path,
    dtype: torch.dtype = torch.float32,
    unet_config: Mapping[str, Any] = SD1_UNET_CONFIG,
    vae_config: Mapping[str, Any] = SD1_VAE_CONFIG,
    with_vae: bool = True,
) -> DiffusionModel:
    """An SD1.x single-file checkpoint (LDM keys) converted by diffusers against explicit configs."""
    diffusers = _diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    path = Path(path)
    tensors, keys = _read_single_file(path, (LDM_UNET_PREFIX, LDM_VAE_PREFIX))
    _check_sd1_file(path.name, keys, tensors, unet_config)
    unet_state = convert_ldm_unet_checkpoint(tensors, dict(unet_config))
    unet = _frozen(_build_loaded(diffusers.UNet2DConditionModel, unet_config, unet_state, path.name, "U-Net", dtype), dtype)
    vae = None
    if with_vae:
        if not any(k.startswith(LDM_VAE_PREFIX) for k in keys):
            raise DiffusionModelError(f"{path.name} holds no VAE ({LDM_VAE_PREFIX}* keys): set model.vae to a VAE file or folder")
        vae_state = convert_ldm_vae_checkpoint({k: v for k, v in tensors.items() if k.startswith(LDM_VAE_PREFIX)}, dict(vae_config))
        vae = _frozen(_build_loaded(diffusers.AutoencoderKL, vae_config, vae_state, path.name, "VAE", dtype), dtype)
    del tensors
    logger.info("Loaded SD1.x U-Net%s from %s", " and VAE" if vae is not None else "", path.name)
    return DiffusionModel(
        "sd1", unet, vae, make_scheduler("sd1"), float(vae_config.get("scaling_factor", 0.18215)),
        int(unet_config["cross_attention_dim"]), path.name,
    )


def _transformer_depth(unet: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many transformer blocks the attention module at ``prefix`` (``input_blocks.4.1.``) holds."""
    start = prefix + "transformer_blocks."
    return len({k[len(start):].split(".", 1)[0] for k in unet if k.startswith(start)})


def sdxl_unet_config_from_shapes(unet: Mapping[str, torch.Tensor], name: str = "the U-Net") -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of an SDXL-family U-Net in the SGM layout (``unet``: its tensors
    or meta tensors of their shapes, keys without ``model.diffusion_model.``), read from the shapes.

    Read: in / out channels, ``block_out_channels`` and ``layers_per_block`` (ResBlocks per level, the same at every
    level), the transformer depth of each level (0: a level without attention, ``DownBlock2D`` / ``UpBlock2D``),
    the text context width, linear or convolutional ``proj_in``, and ``projection_class_embeddings_input_dim``
    (the pooled vector, 1280, plus six size embeddings of ``addition_time_embed_dim``). The rest is SDXL's own and
    leaves no trace in the shapes: heads of 64 channels, 32 norm groups, the embeddings' settings
    (:data:`SDXL_UNET_CONFIG`). SDXL base itself gives exactly :data:`SDXL_UNET_CONFIG`.

    Refused (diffusers' config cannot say it, or this trainer's LoRA layout does not cover it): levels with
    different numbers of ResBlocks, or blocks of one level with different depths; up blocks whose depths are not
    their down level's (diffusers' ``reverse_transformer_layers_per_block``, as SSD-1B's); a middle block whose
    depth is not the last level's (diffusers builds it with the last level's; Segmind-Vega's has no attention).
    """

    def refuse(why: str) -> DiffusionModelError:
        return DiffusionModelError(f"{name}: {why}; the bridge trainer loads SDXL-family U-Nets that diffusers' "
                                   "UNet2DConditionModel builds (the same depth in a level's down and up blocks, the middle "
                                   "block as deep as the last level)")

    numbers: dict[str, set[int]] = {"input_blocks": set(), "output_blocks": set()}
    for key in unet:
        part, _, rest = key.partition(".")
        if part in numbers:
            numbers[part].add(int(rest.split(".", 1)[0]))
    inputs, outputs = sorted(numbers["input_blocks"]), sorted(numbers["output_blocks"])
    if _CONV_IN not in unet or inputs != list(range(len(inputs))) or outputs != list(range(len(outputs))):
        raise refuse("its input / output blocks are not numbered 0, 1, ... from conv_in (input_blocks.0.0) on")
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, transformer depth) of each ResBlock
    for i in inputs[1:]:
        if f"input_blocks.{i}.0.op.weight" in unet:  # a downsampler ends the level
            levels.append([])
            continue
        conv2 = unet.get(f"input_blocks.{i}.0.out_layers.3.weight")
        if conv2 is None:
            raise refuse(f"input block {i} is neither a ResBlock nor a downsampler")
        levels[-1].append((int(conv2.shape[0]), _transformer_depth(unet, f"input_blocks.{i}.1.")))
    layers = len(levels[0])
    if not layers or any(len(level) != layers for level in levels):
        raise refuse(f"its levels hold {[len(level) for level in levels]} ResBlocks (diffusers: the same number at every level)")
    channels, depths = [], []
    for n, level in enumerate(levels):
        if len(set(level)) != 1:
            raise refuse(f"the blocks of its level {n} have (channels, transformer depth) {level}, not one value")
        channels.append(level[0][0])
        depths.append(level[0][1])
    if len(outputs) != len(levels) * (layers + 1):
        raise refuse(f"it has {len(outputs)} output blocks; {len(levels)} levels of {layers} ResBlocks have {len(levels) * (layers + 1)}")
    up = [[_transformer_depth(unet, f"output_blocks.{(layers + 1) * u + j}.1.") for j in range(layers + 1)] for u in range(len(levels))]
    expected_up = [[d] * (layers + 1) for d in reversed(depths)]
    if up != expected_up:
        raise refuse(f"its up blocks' transformer depths are {up}, not their down levels' {expected_up} (diffusers' "
                     "reverse_transformer_layers_per_block, as in SSD-1B)")
    mid = _transformer_depth(unet, "middle_block.1.")
    if not depths[-1] or mid != depths[-1]:
        raise refuse(f"its middle block has {mid} transformer blocks and its last level {depths[-1]}")
    for n, (width, depth) in enumerate(zip(channels, depths, strict=True)):
        if depth and width % SDXL_HEAD_CHANNELS:
            raise refuse(f"its level {n} is {width} channels wide, not a multiple of SDXL's {SDXL_HEAD_CHANNELS}-channel heads")
    proj_in = {unet[k].dim() for k in unet if k.endswith(".1.proj_in.weight")}
    context = _context_width(unet)
    if len(proj_in) != 1 or context is None:
        raise refuse(f"its transformers have proj_in of {sorted(proj_in)} dimensions and text contexts that are not one width")
    adm = unet.get(_ADM)
    extra = int(adm.shape[1]) - SDXL_POOLED_DIM if adm is not None else 0
    if extra <= 0 or extra % 6:
        raise refuse(f"its ADM input ({_ADM}) is {None if adm is None else int(adm.shape[1])} wide, not SDXL's pooled vector "
                     f"({SDXL_POOLED_DIM}) and six size embeddings (SDXL base: 1280 + 6 x 256 = 2816)")
    return {
        **SDXL_UNET_CONFIG,
        "in_channels": int(unet[_CONV_IN].shape[1]), "out_channels": int(unet["out.2.weight"].shape[0]) if "out.2.weight" in unet else 4,
        "block_out_channels": channels, "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        # A level without attention lists 1, as SDXL base's config does for its first level.
        "transformer_layers_per_block": [d or 1 for d in depths],
        "attention_head_dim": [max(1, width // SDXL_HEAD_CHANNELS) for width in channels],
        "cross_attention_dim": context, "use_linear_projection": proj_in == {2},
        "projection_class_embeddings_input_dim": int(adm.shape[1]), "addition_time_embed_dim": extra // 6,
    }


def _check_sdxl_file(name: str, keys: list[str], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Refuse a file that is not an SDXL base-family checkpoint, naming what it is; its U-Net's config otherwise."""
    _check_has_unet(name, keys, "SDXL")
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(LDM_UNET_PREFIX)}
    context = _context_width(unet)
    if _ADM not in unet:
        family = {768: "an SD1.x checkpoint", 1024: "an SD2.x checkpoint"}.get(context, "an SD-style checkpoint")
        todo = 'train it with model.kind = "sd1" (or "auto")' if context == 768 else "the bridge trainer trains SD1.x, SDXL and PixArt"
        raise DiffusionModelError(
            f"{name} is {family} (text context {context} wide, no pooled-text and size embedding {LDM_UNET_PREFIX}{_ADM}), "
            f"not SDXL: {todo}"
        )
    what, todo = _what_sdxl_family(context, int(unet[_ADM].shape[1]))
    if what != "an SDXL checkpoint":
        raise DiffusionModelError(f"{name} is {what}: {todo}")
    conv_in = unet.get(_CONV_IN)
    if conv_in is not None and conv_in.shape[1] != 4:
        raise DiffusionModelError(
            f"{name}'s U-Net takes {conv_in.shape[1]} input channels (an inpainting or instruct model); "
            "the bridge trainer trains text-to-image SDXL U-Nets with 4"
        )
    return sdxl_unet_config_from_shapes(unet, name)


def load_sdxl_single_file(
    path: Path,
    dtype: torch.dtype = torch.float32,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] = SDXL_VAE_CONFIG,
    with_vae: bool = True,
) -> DiffusionModel:
    """An SDXL single-file checkpoint (SGM layout) converted by diffusers' ``convert_ldm_unet_checkpoint`` /
    ``convert_ldm_vae_checkpoint``: the U-Net against its config read from the file's shapes (or ``unet_config``),
    the VAE against ``vae_config`` and kept in float32 when its config says ``force_upcast``. The text encoders
    (``conditioner.embedders.*``) are never read."""
    diffusers = _diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    path = Path(path)
    tensors, keys = _read_single_file(path, (LDM_UNET_PREFIX, LDM_VAE_PREFIX))
    config = _check_sdxl_file(path.name, keys, tensors)
    config = dict(unet_config) if unet_config is not None else config
    unet_state = convert_ldm_unet_checkpoint(tensors, dict(config))
    unet = _frozen(_build_loaded(diffusers.UNet2DConditionModel, config, unet_state, path.name, "U-Net", dtype, "SDXL"), dtype)
    vae = None
    if with_vae:
        if not any(k.startswith(LDM_VAE_PREFIX) for k in keys):
            raise DiffusionModelError(f"{path.name} holds no VAE ({LDM_VAE_PREFIX}* keys): set model.vae to a VAE file or folder")
        vae_state = convert_ldm_vae_checkpoint({k: v for k, v in tensors.items() if k.startswith(LDM_VAE_PREFIX)}, dict(vae_config))
        vae_dtype = torch.float32 if vae_config.get("force_upcast", True) else dtype
        vae = _frozen(_build_loaded(diffusers.AutoencoderKL, vae_config, vae_state, path.name, "VAE", vae_dtype, "SDXL"), vae_dtype)
    del tensors
    logger.info("Loaded SDXL U-Net%s from %s", " and VAE" if vae is not None else "", path.name)
    return DiffusionModel(
        "sdxl", unet, vae, make_scheduler("sdxl"), float(vae_config.get("scaling_factor", 0.13025)),
        int(config["cross_attention_dim"]), path.name,
    )


def check_sdxl_unet_config(name: str, config: Mapping[str, Any]) -> None:
    """Refuse a diffusers U-Net config that is not an SDXL base-family U-Net, naming what it is."""
    problems = []
    context, adm = config.get("cross_attention_dim"), config.get("projection_class_embeddings_input_dim")
    if context == SDXL_REFINER["context"] or adm == SDXL_REFINER["adm"]:
        what, todo = _what_sdxl_family(context, adm)
        raise DiffusionModelError(f"{name} is {what}: {todo}")
    if config.get("addition_embed_type") != "text_time":
        problems.append(f"addition_embed_type {config.get('addition_embed_type')!r} (SDXL: 'text_time')")
    if context != SDXL_CONTEXT_DIM:
        problems.append(f"cross_attention_dim {context} (SDXL: {SDXL_CONTEXT_DIM})")
    time_dim = config.get("addition_time_embed_dim")
    if not isinstance(adm, int) or not isinstance(time_dim, int) or adm - 6 * time_dim != SDXL_POOLED_DIM:
        problems.append(f"projection_class_embeddings_input_dim {adm} with addition_time_embed_dim {time_dim} (SDXL: the pooled "
                        f"{SDXL_POOLED_DIM} + 6 x addition_time_embed_dim)")
    if config.get("in_channels") != 4 or config.get("out_channels") != 4:
        problems.append(f"{config.get('in_channels')} in / {config.get('out_channels')} out channels (SDXL: 4 / 4)")
    if config.get("class_embed_type") or config.get("encoder_hid_dim_type"):
        problems.append("extra conditioning embeddings")
    per_block = config.get("transformer_layers_per_block")
    if config.get("reverse_transformer_layers_per_block") is not None or (
            isinstance(per_block, list) and any(isinstance(d, list) for d in per_block)):
        problems.append("up blocks with other transformer depths than their down blocks (reverse_transformer_layers_per_block, "
                        "as SSD-1B), which this trainer's LoRA layout does not cover")
    if problems:
        raise DiffusionModelError(f"{name} is not an SDXL base U-Net: {'; '.join(problems)}")
    UNetStructure.from_config(dict(config))  # refuses block types outside SD1.x/SD2/SDXL


def load_vae(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, vae_config: Mapping[str, Any] = SD1_VAE_CONFIG) -> nn.Module:
    """A VAE from a diffusers folder (``config.json`` + weights, or a pipeline folder's ``vae/``) or a
    single file in the LDM layout (with or without the ``first_stage_model.`` prefix)."""
    diffusers = _diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DiffusionModelError(f"{path.name}: not a diffusers AutoencoderKL folder ({exc})") from exc
        return _frozen(vae, dtype)
    tensors, keys = _read_single_file(path, ())
    if not any(k.startswith(("encoder.down.", LDM_VAE_PREFIX + "encoder.down.")) for k in keys):
        raise DiffusionModelError(f"{path.name} is not a VAE in the original (LDM) layout ({describe_keys(keys)})")
    state = convert_ldm_vae_checkpoint(tensors, dict(vae_config))
    return _frozen(_build_loaded(diffusers.AutoencoderKL, vae_config, state, path.name, "VAE", dtype), dtype)


def _from_pretrained(cls, folder: Path, subfolder: str, dtype: torch.dtype):
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise DiffusionModelError(f"{folder.name}/{subfolder} could not be loaded as a {cls.__name__} offline: {exc}") from exc


def _load_folder(folder: Path, kind: DiffusionKind, dtype: torch.dtype, with_vae: bool) -> DiffusionModel:
    diffusers = _diffusers()
    if with_vae and not (folder / "vae").is_dir():
        raise DiffusionModelError(f"{folder.name} has no vae/ folder: add one, or set model.vae")
    if kind == "sdxl":  # before any weight is read: a refiner is 2.3 GB
        try:
            config = diffusers.UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DiffusionModelError(f"{folder.name}/unet has no readable config.json: {exc}") from exc
        signature = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters.values()
        defaults = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
        check_sdxl_unet_config(f"{folder.name}/unet", {**defaults, **config})
        vae = _sdxl_vae(_frozen(_from_pretrained(diffusers.AutoencoderKL, folder, "vae", torch.float32), torch.float32), dtype) if with_vae else None
    else:
        vae = _frozen(_from_pretrained(diffusers.AutoencoderKL, folder, "vae", dtype), dtype) if with_vae else None
    scaling = float(vae.config.scaling_factor) if vae is not None else 0.13025 if kind == "sdxl" else 0.18215
    if kind == "sdxl":
        unet = _frozen(_from_pretrained(diffusers.UNet2DConditionModel, folder, "unet", dtype), dtype)
        model = DiffusionModel("sdxl", unet, vae, make_scheduler("sdxl", folder), scaling, int(unet.config.cross_attention_dim), folder.name)
    elif kind == "sd1":
        unet = _frozen(_from_pretrained(diffusers.UNet2DConditionModel, folder, "unet", dtype), dtype)
        config = unet.config
        UNetStructure.from_config(dict(config))  # refuses block types outside SD1.x/SD2
        problems = []
        if config.in_channels != 4 or config.out_channels != 4:
            problems.append(f"{config.in_channels} in / {config.out_channels} out channels (SD1.x: 4 / 4)")
        if config.addition_embed_type or config.class_embed_type:
            problems.append("extra conditioning embeddings (SDXL / upscaler)")
        if not isinstance(config.cross_attention_dim, int):
            problems.append(f"per-block cross-attention widths {config.cross_attention_dim}")
        if problems:
            raise DiffusionModelError(f"{folder.name}/unet is not an SD1.x U-Net: {'; '.join(problems)}")
        if config.cross_attention_dim != SD1_UNET_CONFIG["cross_attention_dim"]:
            logger.warning(
                "%s: the U-Net's text context is %d wide, not SD1.x's 768; the pack's LaVi-Bridge nodes load bridges for "
                "SD1.x U-Nets only", folder.name, config.cross_attention_dim,
            )
        model = DiffusionModel("sd1", unet, vae, make_scheduler("sd1", folder), scaling, int(config.cross_attention_dim), folder.name)
    else:
        transformer = _frozen(_from_pretrained(diffusers.PixArtTransformer2DModel, folder, "transformer", dtype), dtype)
        config = transformer.config
        if config.out_channels not in (config.in_channels, 2 * config.in_channels):
            raise DiffusionModelError(f"{folder.name}/transformer gives {config.out_channels} channels for {config.in_channels} in: not PixArt-alpha")
        model = DiffusionModel("pixart", transformer, vae, make_scheduler("pixart", folder), scaling, int(config.caption_channels), folder.name)
    logger.info("Loaded %s %s from %s", kind, type(model.denoiser).__name__, folder.name)
    return model
