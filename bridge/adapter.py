"""LaVi-Bridge's text adapter: the small network between a language model and a diffusion model.

The official ``TextAdapter(in_dim, int_dim, out_dim)`` (``modules/adapters.py``) is a diffusers
``ModelMixin`` computing ``ff2(norm2(ff1(norm1(x))))`` token by token. It is re-implemented here in
plain PyTorch with the same parameter names, so the released ``adapter/`` folders (written by
diffusers' ``save_pretrained``: ``config.json`` + ``diffusion_pytorch_model.bin`` or
``.safetensors``) load strictly without diffusers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..pooling import PooledHead
from ..weights import build_and_load, describe_keys, read_json_object, read_torch_checkpoint, unwrap_state_dict
from .errors import LaViBridgeFileError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# diffusers' save_pretrained names: safetensors since diffusers 0.22 (the PixArt release), .bin before.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_FIELDS = ("in_dim", "int_dim", "out_dim")
OFFICIAL_CLASS_NAME = "TextAdapter"
# Dropout of the official FeedForward; inactive in eval(), kept so training behaves the same.
FEED_FORWARD_DROPOUT = 0.1
FEED_FORWARD_MULT = 4


# Past any language model or diffusion context (Llama-2-70B is 8192 wide): a config.json or file metadata
# must not describe an adapter that takes gigabytes to build before its weights are checked.
MAX_ADAPTER_WIDTH = 16384


@dataclass(frozen=True)
class TextAdapterConfig:
    """Widths of a LaVi-Bridge adapter: language-model hidden size, intermediate, diffusion context; and, for a
    bridge to SDXL, the width of the pooled vector its pooled head makes (0: none, as every released adapter)."""

    in_dim: int
    int_dim: int
    out_dim: int
    pooled_dim: int = 0

    def __post_init__(self) -> None:
        for name in CONFIG_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_ADAPTER_WIDTH:
                raise LaViBridgeFileError(f"adapter {name} must be a whole number from 1 to {MAX_ADAPTER_WIDTH}, got {value!r}")
        if not isinstance(self.pooled_dim, int) or isinstance(self.pooled_dim, bool) or not 0 <= self.pooled_dim <= MAX_ADAPTER_WIDTH:
            raise LaViBridgeFileError(f"adapter pooled_dim must be a whole number from 0 to {MAX_ADAPTER_WIDTH}, got {self.pooled_dim!r}")

    @property
    def released_pair(self) -> str | None:
        """The released pair whose widths (language model in, diffusion context out) this adapter has,
        whatever its intermediate width: a bridge trained with another ``int_dim`` still follows that
        pair's recipe. The three released pairs differ in their widths."""
        for name, config in RELEASED_ADAPTERS.items():
            if (config.in_dim, config.out_dim) == (self.in_dim, self.out_dim):
                return name
        return None

    @property
    def name(self) -> str | None:
        """The released adapter this exact shape is, if any."""
        pair = self.released_pair
        return pair if pair is not None and RELEASED_ADAPTERS[pair] == self else None


# The three released adapters (HuggingFace shihaozhao/LaVi-Bridge), sizes checked against the
# official class: T5-Large -> SD1.x 21,254,528 params; Llama-2-7B -> SD1.x 228,920,192;
# T5-Large -> PixArt-XL-2 113,288,704 (its 4096 output is the T5-XXL width PixArt expects).
RELEASED_ADAPTERS: dict[str, TextAdapterConfig] = {
    "t5_unet": TextAdapterConfig(1024, 896, 768),
    "llama2_unet": TextAdapterConfig(4096, 2432, 768),
    "t5_transformer": TextAdapterConfig(1024, 2560, 4096),
}


class GEGLU(nn.Module):
    """``a * gelu(g)`` with ``[a, g] = proj(x)`` split in halves (erf GELU, as the official)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU(dim, 4·dim), Dropout, Linear(4·dim, dim_out)]``: keys ``net.0.proj.*``, ``net.2.*``."""

    def __init__(self, dim: int, dim_out: int, mult: int = FEED_FORWARD_MULT, dropout: float = FEED_FORWARD_DROPOUT) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TextAdapter(nn.Module):
    """``[B, T, in_dim] -> [B, T, out_dim]``: ``ff2(norm2(ff1(norm1(x))))``, every token on its own.

    Returns the tensor itself (the official returns ``TextAdapterOutput(sample=...)``). A bridge to SDXL also
    has a ``pooled_head`` (:class:`pooling.PooledHead`): :meth:`pooled` makes SDXL's pooled vector from the
    adapter's tokens.
    """

    def __init__(self, config: TextAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.ff1 = FeedForward(config.in_dim, config.int_dim)
        self.ff2 = FeedForward(config.int_dim, config.out_dim)
        self.norm1 = nn.LayerNorm(config.in_dim)
        self.norm2 = nn.LayerNorm(config.int_dim)
        if config.pooled_dim:
            self.pooled_head = PooledHead(config.out_dim, config.pooled_dim)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """SDXL's ``[B, pooled_dim]`` vector from this adapter's output ``tokens``; None without a pooled head."""
        return self.pooled_head(tokens) if self.config.pooled_dim else None

    @property
    def in_dim(self) -> int:
        return self.config.in_dim

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.in_dim:
            raise ValueError(
                f"LaVi-Bridge adapter expects language-model features of width {self.config.in_dim}, got "
                f"{x.shape[-1]}: use the language model this adapter was trained with"
            )
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))


def check_widths(adapter: TextAdapter | TextAdapterConfig, lm_hidden: int, context_dim: int) -> None:
    """Raise :class:`LaViBridgeFileError` unless the adapter bridges ``lm_hidden`` to ``context_dim``.

    ``lm_hidden`` is the language model's hidden size, ``context_dim`` the cross-attention width of
    the diffusion model (768 for SD1.x, 4096 for PixArt's caption projection).
    """
    config = adapter.config if isinstance(adapter, TextAdapter) else adapter
    problems = []
    if config.in_dim != lm_hidden:
        problems.append(f"it takes {config.in_dim}-wide language-model features but the language model gives {lm_hidden}")
    if config.out_dim != context_dim:
        problems.append(f"it gives {config.out_dim}-wide context but the diffusion model expects {context_dim}")
    if problems:
        released = ", ".join(f"{n} ({c.in_dim}->{c.out_dim})" for n, c in RELEASED_ADAPTERS.items())
        raise LaViBridgeFileError(
            f"LaVi-Bridge adapter does not fit: {'; '.join(problems)}. Use the adapter released for this pair "
            f"of models (released: {released})"
        )


def read_adapter_config(folder: Path) -> TextAdapterConfig:
    """The widths from a diffusers ``config.json`` (``in_dim``, ``int_dim``, ``out_dim``)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LaViBridgeFileError(
            f"{folder.name} has no config.json: pick the whole 'adapter' folder of a LaVi-Bridge release "
            "(config.json plus diffusion_pytorch_model.bin or .safetensors)"
        )
    raw = read_json_object(path, LaViBridgeFileError, f"{folder.name}/config.json", ": re-download it")
    class_name = raw.get("_class_name", OFFICIAL_CLASS_NAME)
    if class_name != OFFICIAL_CLASS_NAME:
        raise LaViBridgeFileError(
            f"{folder.name}/config.json describes a {class_name}, not a LaVi-Bridge TextAdapter: "
            "pick the 'adapter' subfolder of a LaVi-Bridge checkpoint"
        )
    missing = [name for name in CONFIG_FIELDS if name not in raw]
    if missing:
        raise LaViBridgeFileError(
            f"{folder.name}/config.json lacks {', '.join(missing)}: a LaVi-Bridge adapter config names "
            f"{', '.join(CONFIG_FIELDS)}; re-download it"
        )
    return TextAdapterConfig(**{name: raw[name] for name in CONFIG_FIELDS})


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    return {k: f.get_tensor(k) for k in f.keys()}, name
            except Exception as exc:
                raise LaViBridgeFileError(f"{folder.name}/{name} is not a readable safetensors file ({exc}): re-download it") from exc
        obj = unwrap_state_dict(read_torch_checkpoint(path, LaViBridgeFileError, "Re-download the adapter folder."))
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise LaViBridgeFileError(
                f"{folder.name}/{name} holds a {type(obj).__name__}, not an adapter state_dict"
                + (" (lora_*.pt files are lists; load them as LaVi-Bridge LoRA)" if isinstance(obj, list) else "")
            )
        return dict(obj), name
    sharded = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.index.json"))
    hint = f" (found a sharded {sharded[0]}, which this loader does not read: merge the shards)" if sharded else ""
    raise LaViBridgeFileError(
        f"{folder.name} has no adapter weights{hint}: expected {' or '.join(WEIGHT_FILES)} next to config.json"
    )


def load_adapter(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> TextAdapter:
    """Load a LaVi-Bridge ``adapter/`` folder strictly onto the CPU, in eval mode, frozen."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LaViBridgeFileError(
            f"LaVi-Bridge adapter folder not found: {folder}. Point to the 'adapter' folder inside a "
            "LaVi-Bridge checkpoint (e.g. t5_unet/adapter)"
        )
    config = read_adapter_config(folder)
    state_dict, file_name = _read_weights(folder)
    try:
        model = build_and_load(lambda: TextAdapter(config), {k: v.float() for k, v in state_dict.items()}, LaViBridgeFileError,
                               f"{folder.name}/{file_name} does not fit the TextAdapter{(config.in_dim, config.int_dim, config.out_dim)} "
                               "of its config.json")
    except LaViBridgeFileError as exc:
        raise LaViBridgeFileError(f"{exc}. Found {describe_keys(state_dict)}; config.json and the weights must come from "
                                  "the same release") from None
    model = model.to(dtype).eval().requires_grad_(False)
    logger.info(
        "Loaded LaVi-Bridge adapter %s (%s, %d -> %d -> %d)",
        folder.name, config.name or "custom size", config.in_dim, config.int_dim, config.out_dim,
    )
    return model
