"""The sections of a LaVi-Bridge config (``train bridge --help`` lists them with their defaults) and the
learning rates they resolve to; the ``[cache]`` section is :class:`.cache_settings.LatentCacheSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .image_data import ImageCaptionSettings
from .settings import check_file_name, setting

# The official rates: 1e-4 with the SD1.x U-Net, 2e-5 with PixArt. SDXL has no official bridge: its U-Net takes the
# U-Net recipe's rate.
OFFICIAL_LR = {"sd1": 1e-4, "pixart": 2e-5, "sdxl": 1e-4}


@dataclass
class BridgeDataSettings(ImageCaptionSettings):
    """Image-caption pairs: a text file of 'image_path<TAB>caption' lines (the official format; relative paths
    are resolved against the file's folder) or a folder of images with .txt captions of the same name."""


@dataclass
class BridgeModelSettings:
    """The frozen models: the diffusion model (SD1.x or SDXL single file or diffusers folder; PixArt diffusers
    folder) and the language model (a Hugging Face folder: T5 / mT5 encoder, or a Llama-style decoder)."""

    diffusion_model: str = setting(doc="SD1.x or SDXL .safetensors/.ckpt, or a diffusers folder with unet/ or transformer/ and vae/")
    language_model: str = setting(doc="Hugging Face folder of the language model (config, tokenizer, weights)")
    kind: Literal["auto", "sd1", "pixart", "sdxl"] = setting("auto", "the diffusion model's kind (auto: from the file or folder)")
    vae: str = setting("", "a VAE file or folder to use instead of the diffusion model's own (empty: its own)")
    adapter_int_dim: int = setting(0, "the adapter's middle width (0: (in + out) / 2, as every released adapter)")
    language_model_dtype: Literal["fp32", "bf16", "fp16"] = setting("fp32", "dtype of the frozen language-model weights")
    diffusion_model_dtype: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", "dtype of the frozen U-Net / PixArt and VAE weights (SDXL's VAE stays fp32 unless its config says force_upcast false)")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory, ~30% slower)")

    def __post_init__(self) -> None:
        for name in ("diffusion_model", "language_model"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must name a file or folder")
        if self.adapter_int_dim < 0:
            raise ValueError("adapter_int_dim must not be negative")


@dataclass
class BridgeLoraSettings:
    """LoRA in both models: alpha = rank (scale 1.0, as the release), down ~ N(0, 1/rank), up = 0."""

    rank: int = setting(32, "LoRA rank")
    dropout: float = setting(0.1, "dropout on the LoRA branch")
    vision: bool = setting(True, "train a LoRA in the U-Net / PixArt")
    text: bool = setting(True, "train a LoRA in the language model (off: the language model runs without gradients)")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("rank must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")


@dataclass
class BridgeOptimSettings:
    """AdamW with a constant learning rate (after an optional linear warm-up)."""

    lr: float = setting(0.0, "learning rate of the vision LoRA (0: official, 1e-4 for SD1.x and SDXL, 2e-5 for PixArt)")
    adapter_lr: float = setting(0.0, "learning rate of the adapter (0: the same as lr)")
    text_lr: float = setting(5e-6, "learning rate of the text LoRA")
    weight_decay: float = setting(1e-2, "AdamW weight decay")
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, "AdamW epsilon")
    warmup_steps: int = setting(0, "linear warm-up steps (0: none, as the official)")

    def __post_init__(self) -> None:
        if min(self.lr, self.adapter_lr, self.text_lr, self.weight_decay) < 0:
            raise ValueError("learning rates and weight decay must not be negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must not be negative")


@dataclass
class BridgeExportSettings:
    """What the run writes into run.output_dir."""

    name: str = setting("lavibridge", "file and folder name of the trained bridge")
    released_layout: bool = setting(
        True, "also write <name>/ in the released layout (lora_vis.pt, lora_text.pt, adapter/); SD1.x and PixArt only: the "
        "released layout has no place for an SDXL bridge's pooled head")

    def __post_init__(self) -> None:
        check_file_name(self.name)


def resolved_learning_rates(optim: BridgeOptimSettings, kind: str) -> tuple[float, float, float]:
    """(vision LoRA, adapter, text LoRA) learning rates, 0 meaning the official value."""
    vision = optim.lr or OFFICIAL_LR[kind]
    return vision, optim.adapter_lr or vision, optim.text_lr
