"""The frozen diffusion models a LaVi-Bridge trains against: SD1.x U-Nets and PixArt transformers, with
their VAE and noise schedule, loaded offline through diffusers.

- **SD1.x from a single file** (``v1-5-pruned-emaonly.safetensors``, the original LDM key layout): the
  U-Net and VAE are converted with diffusers' own ``convert_ldm_unet_checkpoint`` /
  ``convert_ldm_vae_checkpoint`` against the explicit SD1 configs below (nothing is downloaded), after
  checking the file really is SD1.x (an SDXL, SD2.x or inpainting file is named as such).
- **SD1.x or PixArt from a diffusers folder** (``unet/`` or ``transformer/``, ``vae/``, optional
  ``scheduler/``).

Training objective (the official one): DDPM noise schedule (SD1: ``scaled_linear`` 0.00085–0.012, 1000
steps; PixArt: its own ``linear`` 0.0001–0.02), latents × the VAE's scaling factor (0.18215), uniform
``t`` in [0, 1000), MSE against ε. PixArt predicts ε and a learned variance: the ε half is taken.
"""

from __future__ import annotations

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

DiffusionKind = Literal["sd1", "pixart"]

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
# The training schedules (SD1.x's scheduler_config; PixArt-alpha's).
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "clip_sample": False},
    "pixart": {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "prediction_type": "epsilon", "clip_sample": False},
}
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
SINGLE_FILE_SUFFIXES = (".safetensors", *TORCH_PICKLE_SUFFIXES)
# An SD1.x file's first cross-attention key projection: [320, context width].
_ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_CONV_IN = "input_blocks.0.0.weight"


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
        if self.kind == "sd1":
            targets = unet_lora_targets(UNetStructure.from_config(dict(config)))
        else:
            targets = pixart_lora_targets(config.num_layers, config.num_attention_heads * config.attention_head_dim)
        check_targets(self.denoiser, targets, self.name)
        return targets

    @property
    def learned_sigma(self) -> bool:
        config = self.denoiser.config
        return self.kind == "pixart" and config.out_channels == 2 * config.in_channels

    def predict_noise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """ε prediction of ``denoiser`` (default: the frozen one; pass the LoRA-injected module)."""
        denoiser = denoiser if denoiser is not None else self.denoiser
        if self.kind == "sd1":
            return denoiser(noisy, timesteps, encoder_hidden_states=context).sample
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
            "(SD1.x, PixArt-alpha), not v-prediction (SD2.x 768)"
        )
    return scheduler


# ---------------------------------------------------------------------------------------------------
# Loading


def detect_kind(path: str | os.PathLike[str]) -> DiffusionKind:
    """``sd1`` for a single file or a folder with ``unet/``, ``pixart`` for a folder with ``transformer/``."""
    path = Path(path)
    if path.is_file():
        return "sd1"
    if (path / "transformer").is_dir():
        return "pixart"
    if (path / "unet").is_dir():
        return "sd1"
    raise DiffusionModelError(
        f"{path} is neither a single-file SD1.x checkpoint nor a diffusers folder with unet/ (SD1.x) or transformer/ "
        "(PixArt) and vae/"
    )


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
    ``vae_config``: the diffusers configs single files are converted against (default SD1.5's).
    """
    path = Path(path)
    if not path.exists():
        raise DiffusionModelError(f"diffusion model not found: {path}")
    detected = detect_kind(path)
    if kind != "auto" and kind != detected:
        raise DiffusionModelError(f"{path.name} looks like a {detected} model, but model.kind says {kind}")
    if path.is_file():
        model = load_sd1_single_file(path, dtype, unet_config or SD1_UNET_CONFIG, vae_config or SD1_VAE_CONFIG, with_vae=vae is None)
    else:
        model = _load_folder(path, detected, dtype, with_vae=vae is None)
    if vae is not None:
        model.vae = load_vae(vae, dtype, vae_config or SD1_VAE_CONFIG)
        model.scaling_factor = float(model.vae.config.scaling_factor)
    return model


def _frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


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


def _check_sd1_file(name: str, keys: list[str], tensors: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> None:
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        if any(k.startswith("down_blocks.") for k in keys):
            what = "a diffusers U-Net weight file: give the whole diffusers folder (unet/, vae/) instead"
        elif any(k.startswith(("blocks.0.attn.qkv", "transformer_blocks.0.attn1")) for k in keys):
            what = "a PixArt transformer: give PixArt as a diffusers folder (transformer/, vae/)"
        elif any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
            what = "a standalone VAE: set it as model.vae and give the SD1.x checkpoint as model.diffusion_model"
        else:
            what = f"not a Stable Diffusion checkpoint ({describe_keys(keys)})"
        raise DiffusionModelError(f"{name} has no U-Net ({LDM_UNET_PREFIX}* keys): it is {what}")
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{LDM_UNET_PREFIX}label_emb.0.0.weight" in keys:
        raise DiffusionModelError(f"{name} is an SDXL checkpoint; the bridge trainer trains SD1.x U-Nets (or PixArt)")
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
) -> nn.Module:
    """``cls.from_config(config)`` holding exactly ``state`` in ``dtype`` (built on the meta device: no random init)."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = cls.from_config(dict(config))
    details = state_dict_mismatch(model.state_dict(), state)
    if details:
        raise DiffusionModelError(f"{name}: the {what} does not have the SD1.x layout: {details}")
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
    vae = _frozen(_from_pretrained(diffusers.AutoencoderKL, folder, "vae", dtype), dtype) if with_vae else None
    scaling = float(vae.config.scaling_factor) if vae is not None else 0.18215
    if kind == "sd1":
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
