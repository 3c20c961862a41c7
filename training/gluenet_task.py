"""``train gluenet``: GlueGen's GlueNet trainer (text, sound, point clouds) on the shared training loop.

    python path/to/ComfyUI-X2I train gluenet --config gluenet_fr.toml

The frozen source encoder and the target (SD1.x's CLIP text encoder, or SDXL's two with ``target.kind = "sdxl"``)
run once over the data and their features are cached on disk (:mod:`training.features`); epochs then read the cache, so training costs only the
GlueNet. The objective and the per-modality defaults are the official ones
(:mod:`training.gluenet_objective`); the result is a ``.safetensors`` GlueNet that X2I GlueNet Loader
loads, carrying its architecture, scaling, language and encoder in its metadata.

Official defaults (applied when a setting is left at 0 / "auto"):

| modality | GlueNet | mult | input ÷ | lr | lr halves every | epochs | batch |
|---|---|---|---|---|---|---|---|
| text | ``translator_noln(77, width, 768, depth 5)`` | 2 | 3 | 1e-4 | 1 epoch | 4 | 32 |
| audio | ``translator_w_head(width/64, 77, 64, 768, depth 5)`` | 4 | 1 | 5e-5 | 5 epochs | 10 | 8 |
| point_cloud | as audio (ULIP's embedding cut into 64-wide tokens) | 4 | 1 | 5e-5 | 5 epochs | 10 | 8 |
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..families import Family, family
from ..gluenet import GlueNet, GlueNetConfig, GlueNetConfigError, save_gluenet
from ..gluenet.scaling import per_token_norm
from .cache_settings import CacheSettings, cache_folder
from .config import ConfigError, as_dict
from .distributed import Distributed
from .errors import TrainingError
from .features import FeatureCache, ShardedFeatures
from .fingerprints import fingerprint_path, hash_strings
from .gluenet_data import AudioClip, GlueNetDataSettings, GlueNetListing
from .gluenet_listing import build_listing
from .gluenet_objective import GlueNetLossSettings, GlueNetObjective, alignment_metrics, pooled_metrics
from .gluenet_sources import (
    SourceSettings,
    describe_source_settings,
    load_source_encoder,
    resolve_path,
    source_encode_fn,
    source_item_shape,
    target_encode_fn,
)
from .settings import setting
from .targets import (
    TargetSettings,
    check_target_width,
    load_target_encoder,
    peek_target_width,
    tokenizer_folder,
    unpack_target,
)
from .task import TrainingTask

logger = logging.getLogger(__name__)

Architecture = Literal["auto", "translator", "translator_noln", "translator_w_head", "translator_attn"]
# Official settings per modality (see the module docstring).
OFFICIAL = {
    "text": {"architecture": "translator_noln", "mult": 2, "input_divisor": 3.0, "lr": 1e-4, "lr_step_epochs": 1,
             "epochs": 4, "batch_size": 32},
    "audio": {"architecture": "translator_w_head", "mult": 4, "input_divisor": 1.0, "lr": 5e-5, "lr_step_epochs": 5,
              "epochs": 10, "batch_size": 8},
}
OFFICIAL["point_cloud"] = OFFICIAL["audio"]
# What a target cache holds, per target family (part of its fingerprint), and the cache's folder name.
TARGET_CONVENTIONS = {
    "sd1": "77 tokens, padded with the end token, no attention mask, last_hidden_state",
    "sdxl": "77 tokens; CLIP-L padded with the end token, bigG with 0; no attention mask; penultimate layers of both "
            "concatenated; bigG's projected end token as row 78",
}
TARGET_CACHES = {"sd1": "target-clip", "sdxl": "target-sdxl"}
# How many training targets (the first, in order: the same on every rank and after a resume) the per-token and
# pooled norms of a GlueNet for a family other than SD1.x are measured on; a multi-million-caption cache is not
# read end to end to start a run.
NORM_SAMPLES = 4096


@dataclasses.dataclass
class GlueNetModelSettings:
    """The ``[model]`` section: the GlueNet's shape and its input/output convention (0 / "auto": official)."""

    architecture: Architecture = setting("auto", "auto: translator_noln for text, translator_w_head for embeddings (official)")
    out_dim: int = setting(0, "the target's width; 0: the target family's (SD1.x 768, SDXL 2048)")
    mult: int = setting(0, "MLP width multiplier; 0: 2 for text, 4 for embeddings (official)")
    depth: int = setting(5, "mixer blocks (GlueNet-5RM: 5)")
    token_width: int = setting(64, "an embedding of size E enters as E / token_width tokens (AudioCLIP: 1024 = 16 x 64)")
    input_divisor: float = setting(0.0, "features are divided by this first; 0: 3 for text (XLM-R, 'over3'), 1 otherwise")
    language: str = setting("", "ISO 639-1 code written into the file, for the GlueNet Router (text)")
    encoder_hint: str = setting("", "the source encoder's name written into the file; default: its file or folder name")

    def __post_init__(self) -> None:
        for name in ("depth", "token_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive")
        if self.mult < 0 or self.input_divisor < 0 or self.out_dim < 0:
            raise ValueError("model.out_dim, model.mult and model.input_divisor must be >= 0 (0: the default)")


@dataclasses.dataclass
class GlueNetOptimSettings:
    """The ``[optim]`` section: Adam and a step schedule (0: official per modality)."""

    lr: float = setting(0.0, "Adam learning rate; 0: 1e-4 for text, 5e-5 otherwise (official)")
    lr_step_epochs: int = setting(0, "multiply the rate by lr_gamma every this many epochs; 0: 1 for text, 5 otherwise")
    lr_gamma: float = setting(0.5, "the step schedule's factor")
    betas: list[float] = setting(doc="Adam betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = setting(0.0, "Adam weight decay")

    def __post_init__(self) -> None:
        if self.lr < 0 or self.lr_step_epochs < 0 or not 0 < self.lr_gamma <= 1 or len(self.betas) != 2:
            raise ValueError("optim: lr >= 0, lr_step_epochs >= 0, 0 < lr_gamma <= 1, betas = [b1, b2]")


@dataclasses.dataclass
class GlueNetExportSettings:
    """The ``[export]`` section."""

    name: str = setting("gluenet", "writes <run.output_dir>/<name>.safetensors; copy it to ComfyUI/models/gluenet")


def _draw(seed: int, sample: int, epoch: int, count: int) -> int:
    """A uniform choice in ``range(count)`` fixed by (seed, sample, epoch): the same in every process,
    with any number of loader workers, and after a resume."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, sample, epoch), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def gluenet_optimizer(model: nn.Module, lr: float, betas: list[float], weight_decay: float = 0.0, **_: Any) -> torch.optim.Optimizer:
    """The official optimiser: Adam over the encoder, decoder and discriminator together. On CUDA the
    fused kernel (one launch for all tensors; same update, same state layout for checkpoints)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)


class GlueNetTrainingSet(torch.utils.data.Dataset):
    """``{"source", "target"}`` feature pairs read from the caches. A sample with several candidate
    targets (a class's prompts) gets one drawn per epoch, as the official sound script draws a
    random prompt each time it sees a clip."""

    def __init__(self, sources: ShardedFeatures, targets: ShardedFeatures, samples: list[tuple[int, tuple[int, ...]]],
                 indices: list[int], seed: int) -> None:
        self.sources, self.targets = sources, targets
        self.samples, self.indices, self.seed = samples, indices, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.indices[i]
        source, candidates = self.samples[sample]
        choice = candidates[0] if len(candidates) == 1 else candidates[_draw(self.seed, sample, self.epoch, len(candidates))]
        return {"source": self.sources[source], "target": self.targets[choice]}


class GlueNetTask(TrainingTask):
    kind = "gluenet"
    SECTIONS = {
        "data": GlueNetDataSettings,
        "source": SourceSettings,
        "target": TargetSettings,
        "model": GlueNetModelSettings,
        "loss": GlueNetLossSettings,
        "optim": GlueNetOptimSettings,
        "cache": CacheSettings,
        "export": GlueNetExportSettings,
    }
    # The text recipe's; audio and point clouds officially use 10 epochs of batch 8 (see run_defaults).
    RUN_DEFAULTS = {"epochs": OFFICIAL["text"]["epochs"], "batch_size": OFFICIAL["text"]["batch_size"]}

    def __init__(self, data: GlueNetDataSettings, source: SourceSettings, target: TargetSettings,
                 model: GlueNetModelSettings, loss: GlueNetLossSettings, optim: GlueNetOptimSettings,
                 cache: CacheSettings, export: GlueNetExportSettings, output_dir: str = "", seed: int = 0) -> None:
        self.data, self.source, self.target = data, source, target
        self.model_settings, self.loss, self.optim, self.cache, self.export_settings = model, loss, optim, cache, export
        self.output_dir = output_dir
        self.seed = seed
        self.official = OFFICIAL[data.modality]
        self.listing: GlueNetListing | None = None
        self.gluenet_config: GlueNetConfig | None = None
        self.cache_states: dict[str, str] = {}
        self.usable: dict[str, int] = {}

    @classmethod
    def run_defaults(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The official epochs and batch size of the configured modality (text: 4 x 32; sound, point clouds: 10 x 8)."""
        modality = raw.get("data", {}).get("modality", "text")
        official = OFFICIAL.get(modality, OFFICIAL["text"])
        return {"epochs": official["epochs"], "batch_size": official["batch_size"]}

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> GlueNetTask:
        run = raw.get("run", {})
        return cls(**cls.read_sections(raw), output_dir=str(run.get("output_dir", "")), seed=int(run.get("seed", 0)))

    # -- resolved settings ---------------------------------------------------------------------------

    @property
    def modality(self) -> str:
        return self.data.modality

    @property
    def target_family(self) -> Family:
        return family(self.target.kind)

    def resolved_optim(self) -> dict[str, Any]:
        return {
            "lr": self.optim.lr or self.official["lr"],
            "lr_step_epochs": self.optim.lr_step_epochs or self.official["lr_step_epochs"],
            "lr_gamma": self.optim.lr_gamma, "betas": list(self.optim.betas), "weight_decay": self.optim.weight_decay,
        }

    def resolved_model(self) -> dict[str, Any]:
        m = self.model_settings
        return {
            "architecture": self.official["architecture"] if m.architecture == "auto" else m.architecture,
            "out_dim": m.out_dim or self.target_family.token_width, "mult": m.mult or self.official["mult"], "depth": m.depth, "token_width": m.token_width,
            "input_divisor": m.input_divisor or self.official["input_divisor"], "language": m.language or None,
            "encoder_hint": m.encoder_hint or (Path(self.source.encoder).name if self.source.encoder else None),
        }

    def config(self) -> dict[str, Any]:
        cache = as_dict(self.cache)
        for key in ("dir", "encode_batch_size", "verify", "shard_size"):  # where and how the cache is built, not what it holds
            cache.pop(key)
        return {
            "data": as_dict(self.data), "source": as_dict(self.source), "target": as_dict(self.target),
            "model": self.resolved_model(), "loss": as_dict(self.loss), "optim": self.resolved_optim(),
            "cache": cache, "export": as_dict(self.export_settings),
        }

    def build_gluenet_config(self, source_shape: tuple[int, ...], target_norms: tuple[tuple[float, ...], float] | None = None) -> GlueNetConfig:
        """The GlueNet for features of ``source_shape`` (``[tokens, width]`` or ``[embedding]``); ``target_norms``:
        the per-token and pooled norms measured on the targets, for a family other than SD1.x."""
        m = self.resolved_model()
        output_norm, pooled_norm = target_norms if target_norms is not None else (None, 1.0)
        if len(source_shape) == 2:
            tokens, width = source_shape
        else:
            (size,) = source_shape
            if size % m["token_width"]:
                raise TrainingError(
                    f"the source embedding has {size} values, not a multiple of model.token_width = {m['token_width']}; "
                    "choose a token width that divides it"
                )
            tokens, width = size // m["token_width"], m["token_width"]
        try:
            return GlueNetConfig(
                architecture=m["architecture"], num_tokens=tokens, in_dim=width, out_dim=m["out_dim"], mult=m["mult"],
                depth=m["depth"], num_tokens_out=77 if m["architecture"] == "translator_w_head" else None,
                input_divisor=m["input_divisor"], output_scaling="tensor_norm_half", language=m["language"],
                encoder_hint=m["encoder_hint"], target=self.target_family.key, output_norm=output_norm,
                pooled_dim=self.target_family.pooled_dim, pooled_norm=pooled_norm,
            )
        except GlueNetConfigError as exc:
            raise ConfigError(f"[model] {exc}") from exc

    # -- data and caches ------------------------------------------------------------------------------

    def _caches(self, listing: GlueNetListing) -> dict[str, FeatureCache]:
        verify = self.cache.verify
        source_fp = {
            "role": "source", "encoder": fingerprint_path(resolve_path(self.source.encoder, None), verify),
            "settings": describe_source_settings(self.modality, self.source, self.data.surface_points),
            "data": hash_strings(listing.source_keys()),
        }
        target_fp = {
            "role": "target", "clip": fingerprint_path(Path(self.target.clip).expanduser(), verify),
            "tokenizer": fingerprint_path(tokenizer_folder(self.target), verify), "clip_dtype": self.target.dtype,
            "settings": TARGET_CONVENTIONS[self.target.kind], "data": hash_strings(listing.target_texts),
        }
        root = cache_folder(self.cache.dir, self.output_dir, "feature_cache", "the feature cache needs a folder")
        return {
            "source": FeatureCache(root, f"source-{self.modality}", source_fp, len(listing.sources), self.cache.dtype, self.cache.shard_size),
            "target": FeatureCache(root, TARGET_CACHES[self.target.kind], target_fp, len(listing.target_texts), self.cache.dtype,
                                   self.cache.shard_size),
        }

    def prepare(self, dist: Distributed, log: logging.Logger, *, dry_run: bool = False) -> None:
        if not self.source.encoder:
            raise ConfigError("set source.encoder: the frozen encoder the GlueNet translates from")
        if not self.target.clip:
            raise ConfigError("set target.clip: an SD1.x checkpoint or a Hugging Face CLIP folder (target.kind = \"sdxl\": "
                              "an SDXL base checkpoint)")
        listing = build_listing(self.data, seed=self.data_seed)
        self.listing = listing
        out_dim = self.resolved_model()["out_dim"]
        width = peek_target_width(self.target)
        if width is not None:
            check_target_width(width, out_dim, Path(self.target.clip).name)
        caches = self._caches(listing)
        self.cache_states = {name: cache.state() for name, cache in caches.items()}
        if dry_run:
            if self.modality == "audio":
                self._count_unreadable_audio(listing)
            return
        dist.barrier()  # every rank has read the cache states before any rank builds
        for name, cache in caches.items():
            if self.cache_states[name] == "complete":
                if dist.is_main:
                    log.info("feature cache %s: reused (%s)", cache.name, cache.folder)
                continue
            if name == "source":
                encoder = self._load(lambda: load_source_encoder(self.modality, self.source), dist)
                items: list = listing.sources
                encode = source_encode_fn(self.modality, encoder, self.data.surface_points)
                shape = source_item_shape(self.modality, encoder)
            else:
                encoder = self._load(lambda: load_target_encoder(self.target), dist)
                check_target_width(encoder.hidden_size, out_dim, encoder.name)
                rows = 77 + (1 if getattr(encoder, "pooled_dim", 0) else 0)  # SDXL: the pooled vector packed as a 78th row
                items, encode, shape = listing.target_texts, target_encode_fn(encoder), (rows, encoder.hidden_size)
            cache.build(items, encode, shape, dist, self.cache.encode_batch_size, state=self.cache_states[name])
            filled = getattr(encode, "filled", None)
            if filled and filled["count"] and dist.is_main:
                log.info("%d source texts filled all %d token positions (longer ones are truncated, as in the official "
                         "recipe)", filled["count"], self.source.max_length)
            del encoder, encode
            if dist.device.type == "cuda":
                torch.cuda.empty_cache()
        self.sources = caches["source"].open()
        self.targets = caches["target"].open()
        check_target_width(self.targets.item_shape[-1], out_dim, Path(self.target.clip).name)
        usable = [self.sources.valid[s] and all(self.targets.valid[t] for t in c) for s, c in listing.samples]
        self.train_indices = [i for i, ok in enumerate(usable) if ok and not listing.val[i]]
        self.gluenet_config = self.build_gluenet_config(self.sources.item_shape, self._measured_target_norms())
        self.val_indices = [i for i, ok in enumerate(usable) if ok and listing.val[i]][: self.data.val_max_samples]
        skipped = caches["source"].summary()["skipped"]
        self.usable = {"train_samples_usable": len(self.train_indices), "val_samples_used": len(self.val_indices),
                       **{f"skipped_{reason.replace(' ', '_')}": count for reason, count in skipped.items()}}
        self.cache_states = {name: cache.state() for name, cache in caches.items()}
        self._val_data: tuple[torch.Tensor, ...] | None = None

    def _measured_target_norms(self) -> tuple[tuple[float, ...], float] | None:
        """GlueGen's ``tensor_norm`` (mean L2 norm per token position) and the pooled vectors' mean norm, on the
        first :data:`NORM_SAMPLES` training targets; ``None`` for SD1.x, which keeps the official CLIP values."""
        pooled_dim = self.target_family.pooled_dim
        if not pooled_dim:
            return None
        ids = sorted({t for i in self.train_indices for t in self.listing.samples[i][1]})[:NORM_SAMPLES]
        if not ids:
            raise TrainingError("no usable training sample to measure the SDXL targets' norms on")
        tokens, pooled = unpack_target(self.targets.gather(ids).float(), pooled_dim)
        return per_token_norm(tokens), float(pooled.norm(dim=-1).mean())

    @property
    def data_seed(self) -> int:
        return self.seed

    def _load(self, loader, dist: Distributed) -> nn.Module:
        return loader().to(dist.device)

    def _count_unreadable_audio(self, listing: GlueNetListing) -> None:
        """Dry run: read every sound file's header (cheap), so broken files are counted before training."""
        try:
            import soundfile
        except ImportError:
            return
        for clip in listing.sources:
            assert isinstance(clip, AudioClip)
            try:
                soundfile.info(str(clip.path))
            except Exception:
                listing.skipped["unreadable_audio"] += 1

    def describe(self) -> dict[str, int | str]:
        out: dict[str, int | str] = dict(self.listing.describe()) if self.listing else {}
        out.update({f"cache_{name}": state for name, state in self.cache_states.items()})
        out.update(self.usable)
        if self.gluenet_config is not None:
            c = self.gluenet_config
            out["gluenet"] = f"{c.architecture} {c.num_tokens}x{c.in_dim} -> {c.tokens_out}x{c.out_dim}, mult {c.mult}, depth {c.depth}"
        return out

    # -- training ---------------------------------------------------------------------------------------

    def train_dataset(self) -> torch.utils.data.Dataset:
        return GlueNetTrainingSet(self.sources, self.targets, self.listing.samples, self.train_indices, self.data_seed)

    def build_model(self, dist: Distributed) -> nn.Module:
        # Initialised from the run's seed alone: prepare() may or may not have loaded encoders (which
        # draw from the global RNG) depending on whether the caches existed, and a resumed or cached
        # run must start from the same weights as the first one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return GlueNetObjective(self.gluenet_config, self.loss, self.modality, batch_mean=dist.all_reduce_mean)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return gluenet_optimizer(model, **self.resolved_optim())

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        o = self.resolved_optim()
        # Stepped every optimiser step: the official per-epoch StepLR in steps.
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch * o["lr_step_epochs"], gamma=o["lr_gamma"])

    def _validation_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sources ``[N, ...]``, distinct targets ``[G, 77, D]`` and each sample's target id ``[N]``.

        A sample with several candidate prompts is scored against their mean (what MSE training
        converges to); samples sharing the same candidates share one target (a class)."""
        if self._val_data is None:
            # Grouped by the targets' texts, not their indices: two clouds captioned "a chair" share one target.
            groups: dict[tuple[str, ...], tuple[int, ...]] = {}
            ids = []
            for i in self.val_indices:
                candidates = self.listing.samples[i][1]
                key = tuple(self.listing.target_texts[t] for t in candidates)
                groups.setdefault(key, candidates)
                ids.append(list(groups).index(key))
            sources = self.sources.gather([self.listing.samples[i][0] for i in self.val_indices]).float()
            targets = torch.stack([self.targets.gather(list(c)).float().mean(0) for c in groups.values()])
            self._val_data = (sources, targets, torch.tensor(ids, dtype=torch.long))
        return self._val_data

    def validate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_indices:
            return {}
        sources, packed, ids = self._validation_tensors()
        targets, pooled_targets = unpack_target(packed, self.gluenet_config.pooled_dim)
        encoder: GlueNet = model.encoder
        device = next(encoder.parameters()).device
        outputs = [encoder.translate_with_pooled(chunk.to(device)) for chunk in sources.split(64)]
        metrics = alignment_metrics(torch.cat([tokens.float().cpu() for tokens, _ in outputs]), targets, ids)
        if pooled_targets is not None:
            pooled = torch.cat([p.float().cpu() for _, p in outputs])
            metrics.update(pooled_metrics(pooled, pooled_targets, ids))
        return metrics

    def export(self, model: nn.Module, output_dir: Path) -> list[Path]:
        path = Path(output_dir) / f"{self.export_settings.name}.safetensors"
        encoder: GlueNet = model.encoder
        metadata = {"x2i.training": json.dumps({"kind": self.kind, **self.config()}, default=str)}
        save_gluenet(encoder, path, metadata)
        return [path]
