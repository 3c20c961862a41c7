"""The ``[cache]`` section of every kind: where the frozen encoders' outputs are kept and how they are built,
under the same keys everywhere.

- ``dir``: the folder (a GlueNet's feature caches, a U-ViT's latent and CLIP caches, a LaVi-Bridge's
  latent cache). Share it between runs: a cache is reused only when what it was built from is identical.
- ``encode_batch_size``: items per encoder call while a cache is built.
- ``shard_size``: items per shard file (a shard is the unit of work each process encodes).
- ``dtype``: how cached features are stored (GlueNet features, U-ViT CLIP features; latents are fp16).

Before these keys were shared, the bridge and U-ViT trainers read them from ``[data]``; those names still
work (:data:`LATENT_CACHE_RENAMED`, :data:`UVIT_CACHE_RENAMED`) and log a warning naming the new key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import ConfigError
from .settings import setting

LATENT_CACHE_RENAMED = {
    "data.latent_cache": "cache.dir",
    "data.cache_batch_size": "cache.encode_batch_size",
    "data.cache_shard_size": "cache.shard_size",
}
UVIT_CACHE_RENAMED = {
    "data.cache_dir": "cache.dir",
    "data.cache_batch_size": "cache.encode_batch_size",
    "data.cache_shard_size": "cache.shard_size",
    "data.text_cache_dtype": "cache.dtype",
}


@dataclass
class CacheSettings:
    """The ``[cache]`` section: the features of the frozen source and target encoders, computed once."""

    dir: str = setting("", "where features are cached; default: <run.output_dir>/feature_cache (share it between runs)")
    dtype: Literal["fp32", "fp16", "bf16"] = setting("fp32", "storage dtype; fp16 halves the disk and read traffic")
    shard_size: int = setting(0, "items per shard file; 0: about 256 MiB per shard")
    encode_batch_size: int = setting(32, "items per encoder call while the cache is built")
    verify: Literal["stat", "sha256"] = setting("stat", "how encoder files are recognised: size + modification time, or content hash")

    def __post_init__(self) -> None:
        if self.shard_size < 0 or self.encode_batch_size < 1:
            raise ValueError("cache.shard_size must be >= 0 and cache.encode_batch_size >= 1")


@dataclass
class LatentCacheSettings:
    """The ``[cache]`` section: VAE latents of every image, encoded once (unflipped and flipped)."""

    dir: str = setting("", "a folder for VAE latents encoded once (both flips); empty: encode every step")
    encode_batch_size: int = setting(16, "images per VAE call while building the latent cache")
    shard_size: int = setting(1024, "images per latent-cache shard (the unit of work each process encodes)")

    def __post_init__(self) -> None:
        if min(self.encode_batch_size, self.shard_size) < 1:
            raise ValueError("cache.encode_batch_size and cache.shard_size must be at least 1")


@dataclass
class UViTCacheSettings(LatentCacheSettings):
    """The ``[cache]`` section: VAE latents of every image and CLIP features of every caption, encoded once."""

    dir: str = setting("", "folder of the latent and CLIP caches (empty: <run.output_dir>/cache); share it between runs")
    encode_batch_size: int = setting(32, "images / captions per VAE / CLIP call while building the caches")
    dtype: Literal["fp32", "fp16", "bf16"] = setting("fp16", "storage of the cached CLIP features (fp16: 118 KB a caption)")


def cache_folder(configured: str, output_dir: str, default: str, needs: str) -> Path:
    """``cache.dir``, or ``<run.output_dir>/<default>`` when it is empty; ``needs`` completes the error
    when neither is set (e.g. "the feature cache needs a folder")."""
    if configured:
        return Path(configured).expanduser()
    if not output_dir:
        raise ConfigError(f"set cache.dir or run.output_dir: {needs}")
    return Path(output_dir) / default
