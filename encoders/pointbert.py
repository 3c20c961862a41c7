"""ULIP's PointBERT point-cloud encoder (ULIP-1 and ULIP-2), re-implemented in plain PyTorch.

The network is the ``PointTransformer`` of salesforce/ULIP (``models/pointbert``) plus ULIP's
``pc_projection``, with the same parameter names, so a released ULIP checkpoint loads strictly
once its ``module.`` / ``point_encoder.`` prefixes are stripped. The CUDA extensions the official
code needs (pointnet2_ops' furthest point sampling) are replaced by torch code that follows the
CUDA kernel's rules:

- farthest point sampling starts at index 0 and keeps, per point, the squared distance to the
  nearest chosen centre; the next centre is the point with the largest such distance;
- points within ``sqrt(1e-3)`` of the origin are never chosen as centres (after the first): the
  kernel skips ``x² + y² + z² <= 1e-3`` (the encoder's input is centred, so this is a small ball
  around the centroid). The released weights were trained with that rule, so the encoder keeps it;
- exact ties go to the point the kernel's thread tournament keeps (see :func:`farthest_point_sample`).

Input convention (ULIP's datasets): farthest point sampling down to ``num_points`` when a cloud is
larger, then centre at the centroid and scale so the farthest point is at distance 1; ULIP-2's
colour channels are 0..1 (uncoloured clouds get ULIP's constant grey 0.4).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import X2IError
from ..weights import describe_keys, read_torch_checkpoint, state_dict_mismatch
from .pointcloud import MIN_POINTS, PointCloudError, normalize_to_unit_sphere

logger = logging.getLogger(__name__)

# pointnet2_ops' FPS kernel: at most 512 threads per cloud, points with |p|² <= 1e-3 skipped.
CUDA_FPS_MAX_THREADS = 512
CUDA_FPS_MIN_NORM_SQ = 1e-3
# ULIP fills the colour channels of uncoloured clouds (ModelNet40) with this grey.
ULIP_DEFAULT_RGB = 0.4
# Farthest point sampling is O(N x num_points); clouds above this multiple of num_points are first
# cut to it by a seeded random choice (FPS of a 2x random subset covers the shape the same way).
FPS_INPUT_FACTOR = 2


class PointBERTCheckpointError(X2IError):
    """A file that cannot be used as a ULIP PointBERT encoder; the message names the problem and the fix."""


@dataclass(frozen=True)
class PointBERTConfig:
    """Shape of a ULIP PointBERT encoder and the input it expects.

    ``num_groups``/``group_size``/``heads`` are not recoverable from weight shapes; the released
    models all use 512 groups of 32 points and 6 heads (the official yaml files).
    """

    variant: str
    num_points: int
    in_channels: int = 3
    depth: int = 12
    width: int = 384
    heads: int = 6
    mlp_ratio: float = 4.0
    num_groups: int = 512
    group_size: int = 32
    encoder_dims: int = 256
    output_dim: int = 512
    fps_min_norm_sq: float = CUDA_FPS_MIN_NORM_SQ

    def __post_init__(self) -> None:
        if self.in_channels not in (3, 6):
            raise X2IError(f"PointBERT in_channels must be 3 (xyz) or 6 (xyz+rgb), got {self.in_channels}")
        if self.width % self.heads:
            raise X2IError(f"PointBERT width {self.width} is not divisible by heads {self.heads}")
        for name in ("num_points", "depth", "width", "heads", "num_groups", "group_size", "encoder_dims", "output_dim"):
            if int(getattr(self, name)) <= 0:
                raise X2IError(f"PointBERT {name} must be positive, got {getattr(self, name)}")
        if not self.group_size <= self.num_groups <= self.num_points:
            raise X2IError(
                f"PointBERT needs group_size <= num_groups <= num_points, got {self.group_size}, "
                f"{self.num_groups}, {self.num_points}"
            )

    @property
    def feature_dim(self) -> int:
        """Width of ``cat(cls token, max over group tokens)``, the input of ``pc_projection``."""
        return 2 * self.width

    @classmethod
    def ulip1(cls) -> PointBERTConfig:
        """ULIP-1 PointBERT: 8192 xyz points, depth 12, projected to SLIP ViT-B/16's 512-d space."""
        return cls(variant="ulip1", num_points=8192, in_channels=3, depth=12, output_dim=512)

    @classmethod
    def ulip2_colored(cls) -> PointBERTConfig:
        """ULIP-2 PointBERT: 10k xyz+rgb points, depth 18, projected to OpenCLIP ViT-bigG/14's 1280-d space."""
        return cls(variant="ulip2_colored", num_points=10000, in_channels=6, depth=18, output_dim=1280)

    @classmethod
    def ulip2_xyz(cls) -> PointBERTConfig:
        """ULIP-2 PointBERT on xyz only (official ``PointTransformer`` with the 10k yaml)."""
        return cls(variant="ulip2_xyz", num_points=10000, in_channels=3, depth=18, output_dim=1280)

    def to_dict(self) -> dict:
        return asdict(self)


# --- sampling and grouping -------------------------------------------------------------------


def _cuda_fps_threads(n: int) -> int:
    # pointnet2_ops' opt_n_threads: the largest power of two <= n (computed in doubles), capped at 512.
    return max(min(1 << int(math.log(n) / math.log(2)), CUDA_FPS_MAX_THREADS), 1)


def _cuda_tie_order(n: int, device: torch.device) -> torch.Tensor:
    """Point indices sorted by the FPS kernel's preference among exactly equal distances.

    Thread ``k % T`` scans points ``k, k + T, ...`` and keeps the first maximum it sees; the block
    then reduces the T thread winners pairwise (``t`` against ``t + s`` for s = T/2 ... 1),
    keeping the lower slot on ties. The last comparison decides between even and odd threads, so
    among tied threads the one with the smallest bit-reversed id wins, then the earliest point.
    """
    threads = _cuda_fps_threads(n)
    bits = threads.bit_length() - 1
    k = torch.arange(n, device=device)
    tid = k % threads
    reversed_tid = torch.zeros_like(tid)
    for b in range(bits):
        reversed_tid |= ((tid >> b) & 1) << (bits - 1 - b)
    rank = reversed_tid * ((n + threads - 1) // threads) + k // threads
    return torch.argsort(rank)


def farthest_point_sample(xyz: torch.Tensor, n: int, *, min_norm_sq: float = 0.0) -> torch.Tensor:
    """Indices ``[B, n]`` of ``n`` farthest-point samples of ``xyz`` ``[B, N, 3]``, like pointnet2_ops.

    Deterministic: the first sample is index 0; each next one maximises the squared distance to the
    samples chosen so far (computed in float32 as ``dx² + dy² + dz²``). Points with
    ``x² + y² + z² <= min_norm_sq`` are never chosen after the first (the CUDA kernel uses 1e-3;
    the default 0 disables the rule). Exact ties resolve as in the CUDA kernel (not simply the
    lowest index; see :func:`_cuda_tie_order`). Vectorised over the batch; loops over the samples.
    """
    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"farthest_point_sample expects xyz of shape [B, N, 3], got {tuple(xyz.shape)}")
    batch, count, _ = xyz.shape
    if not 0 < n <= count:
        raise ValueError(f"cannot pick {n} farthest points from {count}")
    order = _cuda_tie_order(count, xyz.device)
    # In tie order, torch.argmax (first maximum) reproduces the kernel's choice.
    planes = xyz.float()[:, order].permute(2, 0, 1).contiguous()  # [3, B, N]
    nearest = torch.full((batch, count), 1e10, device=xyz.device)
    if min_norm_sq > 0:
        # The kernel compares the float magnitude with a double constant; so do we (float64).
        norm_sq = (planes[0] * planes[0] + planes[1] * planes[1] + planes[2] * planes[2]).double()
        # Skipped points keep -1: min(-1, d) = -1, so they never win while any real candidate exists.
        nearest = torch.where(norm_sq > min_norm_sq, nearest, torch.full_like(nearest, -1.0))
    picks = torch.zeros(batch, n, dtype=torch.long, device=xyz.device)
    last = torch.zeros(batch, 1, dtype=torch.long, device=xyz.device)
    x, y, z = planes[0], planes[1], planes[2]
    dist, tmp = torch.empty_like(x), torch.empty_like(x)
    # One [B, N] plane per op: for one cloud these stay below torch's parallel grain size, so the
    # thousands of tiny steps never wait on the thread pool (which stalls badly on a busy CPU).
    for i in range(1, n):
        torch.sub(x, x.gather(1, last), out=dist).mul_(dist)
        # dx² + dy² + dz² rounded after each product and sum, as the kernel's source reads (nvcc may
        # fuse multiply-adds there, so distances equal to within an ulp can still fall differently).
        torch.sub(y, y.gather(1, last), out=tmp)
        dist.add_(tmp.mul_(tmp))
        torch.sub(z, z.gather(1, last), out=tmp)
        dist.add_(tmp.mul_(tmp))
        torch.minimum(nearest, dist, out=nearest)
        last = nearest.argmax(dim=1, keepdim=True)
        picks[:, i : i + 1] = last
    return order[picks]


def knn(query: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, M, k]`` of the ``k`` points of ``points`` ``[B, N, 3]`` nearest each ``query`` ``[B, M, 3]``.

    A query that is one of the points finds itself. Squared distances use the same expansion as
    ULIP's ``knn_point`` (``-2 q·p + |q|² + |p|²``) so near-ties fall the same way.
    """
    dist = -2 * torch.matmul(query, points.transpose(1, 2))
    dist += query.pow(2).sum(-1, keepdim=True)
    dist += points.pow(2).sum(-1).unsqueeze(1)
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(
    points: torch.Tensor, num_groups: int, group_size: int, *, min_norm_sq: float = CUDA_FPS_MIN_NORM_SQ
) -> tuple[torch.Tensor, torch.Tensor]:
    """ULIP's grouping: FPS centres, kNN neighbourhoods, neighbours relative to their centre.

    ``points`` ``[B, N, C]`` (C = 3, or 6 with rgb) → neighbourhoods ``[B, G, K, C]`` (xyz minus the
    centre, raw rgb appended) and centres ``[B, G, 3]``.
    """
    xyz = points[..., :3].contiguous()
    centre_idx = farthest_point_sample(xyz, num_groups, min_norm_sq=min_norm_sq)
    centres = xyz.gather(1, centre_idx.unsqueeze(-1).expand(-1, -1, 3))
    idx = knn(centres, xyz, group_size)  # [B, G, K]
    batch, groups, size = idx.shape
    flat = idx.reshape(batch, groups * size, 1)
    neighbours = points.gather(1, flat.expand(-1, -1, points.shape[-1])).reshape(batch, groups, size, -1)
    local = neighbours[..., :3] - centres.unsqueeze(2)
    if points.shape[-1] > 3:
        local = torch.cat([local, neighbours[..., 3:]], dim=-1)
    return local, centres


# --- network ---------------------------------------------------------------------------------


class MiniPointNet(nn.Module):
    """Point-BERT's group encoder: shared MLP, max-pool, concat [global, local], shared MLP, max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_channels, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_channels, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch, num_groups, size, channels = groups.shape
        x = groups.reshape(batch * num_groups, size, channels).transpose(1, 2)
        feature = self.first_conv(x)  # [BG, 256, K]
        pooled = feature.amax(dim=2, keepdim=True)
        feature = self.second_conv(torch.cat([pooled.expand(-1, -1, size), feature], dim=1))
        return feature.amax(dim=2).reshape(batch, num_groups, self.out_channels)


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias; fused SDPA with the default 1/sqrt(head_dim) scale."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm ViT layout)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Blocks that each see ``x + pos``: Point-BERT re-adds the position embedding before every block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBERT(nn.Module):
    """ULIP's ``PointTransformer`` (or ``PointTransformer_Colored``) followed by ``pc_projection``.

    ``state_dict`` keys equal a ULIP checkpoint's ``point_encoder.*`` keys without that prefix,
    plus ``pc_projection``. ``forward`` takes prepared clouds (``num_points`` points, unit sphere)
    and returns the unnormalised ``pc_embed``.
    """

    def __init__(self, config: PointBERTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.encoder = MiniPointNet(config.in_channels, config.encoder_dims)
        self.reduce_dim = nn.Linear(config.encoder_dims, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        self.blocks = TransformerEncoder(width, config.depth, config.heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.pc_projection = nn.Parameter(torch.zeros(config.feature_dim, config.output_dim))

    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Geometry stays in float32 whatever the weights' dtype: bf16 distances would reorder FPS and kNN.
        c = self.config
        return group_points(points.float(), c.num_groups, c.group_size, min_norm_sq=c.fps_min_norm_sq)

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` → ``[B, 2·width]``: ``cat(cls token, max over group tokens)`` (ULIP's ``pc_feat``)."""
        neighbourhoods, centres = self.group(points)
        dtype = self.cls_token.dtype
        tokens = self.reduce_dim(self.encoder(neighbourhoods.to(dtype)))
        pos = self.pos_embed(centres.to(dtype))
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), pos], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward_features(points) @ self.pc_projection


# --- the encoder used by the nodes --------------------------------------------------------------


class PointBERTEncoder(nn.Module):
    """``encode_points(points [B, N, C]) -> [B, output_dim]`` float32, ULIP's point-cloud embedding.

    ``device`` is a plain attribute because ComfyUI's ModelPatcher assigns it; the network runs
    on wherever its parameters are, in their dtype (geometry in float32).

    Output: L2-normalised by default. ULIP never uses ``pc_embed`` raw: the contrastive loss and
    zero-shot evaluation both normalise it first, and GlueGen's sound GlueNet was trained on
    AudioCLIP's normalised embeddings. A point-cloud GlueNet (GlueGen never released one) should be
    trained on the same normalised features that ``encode_points`` returns.
    """

    def __init__(self, config: PointBERTConfig, name: str = "pointbert", normalize: bool = True) -> None:
        super().__init__()
        self.model = PointBERT(config)
        self.config = config
        self.name = name
        self.normalize = normalize
        self.output_dim = config.output_dim
        self.num_points = config.num_points
        self.in_channels = config.in_channels
        self.device = torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.cls_token.dtype

    def _fit_count(self, cloud: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` (all finite) → ``[B, n, C]`` with ``n = min(N, num_points)``: ULIP's FPS subsampling."""
        count = cloud.shape[1]
        if count <= self.num_points:
            return cloud
        cap = FPS_INPUT_FACTOR * self.num_points
        if count > cap:
            # Deterministic (seed 0) and cheap: FPS over millions of points would take seconds.
            generator = torch.Generator().manual_seed(0)
            keep = torch.randperm(count, generator=generator)[:cap].sort().values.to(cloud.device)
            cloud = cloud[:, keep]
            logger.info("%s: %d points cut to %d by a seeded random choice before FPS", self.name, count, cap)
        # Raw coordinates, no origin rule: ULIP's datasets run a plain FPS before normalising.
        idx = farthest_point_sample(cloud[..., :3], self.num_points)
        return cloud.gather(1, idx.unsqueeze(-1).expand(-1, -1, cloud.shape[-1]))

    def _complete(self, cloud: torch.Tensor) -> torch.Tensor:
        """Normalise one prepared-size cloud ``[n, C]``, repeat it up to ``num_points``, fix its channels."""
        xyz = normalize_to_unit_sphere(cloud[:, :3])
        count = xyz.shape[0]
        if count < self.num_points:
            # Whole-cloud repetition, normalised before repeating so copies do not shift the centroid;
            # FPS treats duplicates as zero-distance, so the group centres are the original points.
            repeat = torch.arange(self.num_points, device=cloud.device) % count
            xyz, cloud = xyz[repeat], cloud[repeat]
        if self.in_channels == 3:
            return xyz
        if cloud.shape[-1] == 6:
            rgb = cloud[:, 3:]
            low, high = rgb.aminmax()
            if low < -1e-3 or high > 1 + 1e-3:
                raise PointCloudError(
                    f"{self.name}: colours must be in 0..1, found {low.item():.3g}..{high.item():.3g}; "
                    "divide 0..255 colours by 255 (load_point_cloud does this for files)"
                )
            rgb = rgb.clamp(0, 1)
        else:
            rgb = torch.full_like(xyz, ULIP_DEFAULT_RGB)
        return torch.cat([xyz, rgb], dim=-1)

    def prepare_points(self, points: torch.Tensor) -> torch.Tensor:
        """ULIP's input convention: ``[B, N, C]`` (or one cloud ``[N, C]``) → ``[B, num_points, in_channels]`` float32.

        Per cloud: non-finite points dropped (with a warning; fewer than 32 left is refused); if
        N > num_points, FPS from index 0 down to num_points (above 2×num_points a seeded random
        choice first); centre at the centroid, scale to the unit sphere; if N < num_points, the
        whole cloud repeated (index ``i % N``). Colour: C = 6 carries rgb in 0..1; a colour model
        given xyz gets ULIP's grey 0.4, an xyz model given rgb ignores it.
        """
        if points.dim() == 2:
            points = points.unsqueeze(0)
        if points.dim() != 3 or points.shape[-1] not in (3, 6):
            raise PointCloudError(
                f"{self.name}: expected points of shape [batch, N, 3] (xyz) or [batch, N, 6] (xyz + rgb 0..1), "
                f"got {tuple(points.shape)}"
            )
        if points.shape[0] == 0:
            raise PointCloudError(f"{self.name}: the batch holds no point clouds")
        points = points.detach().float()
        finite = torch.isfinite(points).all(dim=-1)
        if bool(finite.all()):
            clouds = list(self._fit_count(points).unbind(0))
        else:
            clouds = []
            for i, (cloud, ok) in enumerate(zip(points, finite, strict=True)):
                kept = int(ok.sum())
                if kept < cloud.shape[0]:
                    if kept < MIN_POINTS:
                        raise PointCloudError(
                            f"{self.name}: cloud {i} has only {kept} finite points of {cloud.shape[0]} (NaN/Inf "
                            f"coordinates); PointBERT needs at least {MIN_POINTS}: fix the source data"
                        )
                    logger.warning("%s: cloud %d: dropped %d points with NaN/Inf values", self.name, i, cloud.shape[0] - kept)
                clouds.append(self._fit_count(cloud[ok].unsqueeze(0))[0])
        for i, cloud in enumerate(clouds):
            if cloud.shape[0] < MIN_POINTS:
                raise PointCloudError(
                    f"{self.name}: cloud {i} has {cloud.shape[0]} points; PointBERT groups {MIN_POINTS} neighbours, "
                    f"so at least {MIN_POINTS} are needed: sample more points (raise surface_points for meshes)"
                )
        return torch.stack([self._complete(cloud) for cloud in clouds])

    @torch.inference_mode()
    def encode_points(self, points: torch.Tensor, *, normalize: bool | None = None) -> torch.Tensor:
        """``[B, N, C]`` points (any N ≥ 32, C = 3 or 6) → ``[B, output_dim]`` float32 on the model's device.

        ``normalize`` (default: the encoder's ``normalize``, True) L2-normalises the embedding as
        ULIP does before every use.
        """
        param = self.model.cls_token
        prepared = self.prepare_points(points.to(param.device))
        embed = self.model(prepared).float()
        if self.normalize if normalize is None else normalize:
            embed = F.normalize(embed, dim=-1)
        return embed


# --- loading -----------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^blocks\.blocks\.(\d+)\.")


def _read_checkpoint(path: Path) -> object:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise PointBERTCheckpointError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    # ULIP's training script saves its argparse Namespace next to the weights ('args'); it is plain
    # data, so it is allowed through the weights-only unpickler.
    fix = "Re-download it from the ULIP release, or load a safetensors copy of its state_dict."
    return read_torch_checkpoint(path, PointBERTCheckpointError, fix, allowed_globals=[argparse.Namespace])


def _wrong_file_hint(keys: list[str]) -> str:
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "This is a Stable Diffusion checkpoint: it belongs in models/checkpoints."
    if any(re.match(r"^(blocks|in_blocks|out_blocks)\.\d+\.net_(sen|tok)\.", k) or k.startswith("tail.net_") for k in keys):
        return "This is a GlueNet translator: load it with the X2I GlueNet Loader."
    if any(k.startswith(("transformer_q.", "base_model.", "dvae.")) for k in keys):
        return "This is a Point-BERT pre-training checkpoint, which has no ULIP pc_projection: use a ULIP checkpoint."
    if any(k.startswith(("visual.", "token_embedding.", "open_clip_model.")) for k in keys):
        return "It holds ULIP's image/text towers but no point encoder."
    return ""


def extract_point_encoder_state(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The PointBERT tensors of a ULIP checkpoint, keys as in :class:`PointBERT`.

    Accepts ``{'state_dict': {...}}`` (ULIP's files, keys ``module.point_encoder.*`` and
    ``module.pc_projection``) or a flat state_dict, with or without the prefixes. ULIP's image and
    text towers, ``logit_scale`` and optimizer state are ignored.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("base_model"), Mapping) and "state_dict" not in obj:
        raise PointBERTCheckpointError(
            f"{source} is a Point-BERT pre-training checkpoint ('base_model'), which has no ULIP pc_projection: "
            "use a ULIP PointBERT checkpoint"
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise PointBERTCheckpointError(
            f"{source} holds a {type(obj).__name__}, not a ULIP checkpoint (a dict with a 'state_dict' of tensors)"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    stripped = {}
    for key, value in tensors.items():
        while key.startswith("module."):
            key = key[len("module."):]
        stripped[key] = value
    if any(k.startswith("point_encoder.") for k in stripped):
        state = {k[len("point_encoder."):]: v for k, v in stripped.items() if k.startswith("point_encoder.")}
        if "pc_projection" in stripped:
            state["pc_projection"] = stripped["pc_projection"]
    else:
        state = dict(stripped)  # already a bare point-encoder state_dict (e.g. re-saved)
    keys = sorted(stripped)
    if "encoder.first_conv.0.weight" not in state:
        if any(k.startswith("point_encoder.") for k in stripped):
            raise PointBERTCheckpointError(
                f"{source} is a ULIP checkpoint with another 3D backbone (found {describe_keys(sorted(state), limit=4)}); "
                "only PointBERT is supported: download the PointBERT checkpoint"
            )
        raise PointBERTCheckpointError(
            f"{source} is not a ULIP PointBERT checkpoint: found {describe_keys(keys, limit=4)}, expected "
            "'module.point_encoder.encoder.first_conv.0.weight' ... and 'module.pc_projection'. "
            + _wrong_file_hint(keys)
        )
    if "pc_projection" not in state:
        raise PointBERTCheckpointError(
            f"{source} has a PointBERT encoder but no 'pc_projection' (ULIP's projection into the CLIP space): "
            "use a ULIP checkpoint, not a bare Point-BERT backbone"
        )
    return state


def detect_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> PointBERTConfig:
    """ULIP-1 or ULIP-2 from shapes: depth (block count), projection width, input channels (first conv)."""
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))), default=-1)
    in_channels = int(state["encoder.first_conv.0.weight"].shape[1])
    feature_dim, output_dim = (int(s) for s in state["pc_projection"].shape)
    width = int(state["reduce_dim.weight"].shape[0]) if "reduce_dim.weight" in state else feature_dim // 2
    encoder_dims = int(state["encoder.second_conv.3.weight"].shape[0]) if "encoder.second_conv.3.weight" in state else 256
    if depth == 0 or feature_dim != 2 * width:
        raise PointBERTCheckpointError(
            f"{source}: PointBERT weights are incomplete or inconsistent (depth {depth}, width {width}, "
            f"pc_projection {feature_dim}x{output_dim}, expected {2 * width}x...)"
        )
    presets = [PointBERTConfig.ulip1(), PointBERTConfig.ulip2_colored(), PointBERTConfig.ulip2_xyz()]
    for preset in presets:
        if (preset.depth, preset.in_channels, preset.output_dim, preset.width) == (depth, in_channels, output_dim, width):
            return preset
    # Not a released layout: keep what the shapes say; ULIP-2 (OpenCLIP bigG, 1280) used 10k points.
    num_points = 10000 if output_dim == 1280 or in_channels == 6 else 8192
    logger.warning(
        "%s: PointBERT layout (depth %d, %d input channels, projection %d) matches no released ULIP model; "
        "using %d points, 512 groups of 32, %d heads",
        source, depth, in_channels, output_dim, num_points, 6,
    )
    variant = "ulip2_custom" if num_points == 10000 else "ulip1_custom"
    try:
        return PointBERTConfig(
            variant=variant, num_points=num_points, in_channels=in_channels, depth=depth, width=width,
            encoder_dims=encoder_dims, output_dim=output_dim,
        )
    except ValueError as exc:
        raise PointBERTCheckpointError(f"{source}: {exc}") from exc


def build_pointbert(config: PointBERTConfig, state: Mapping[str, torch.Tensor], name: str = "pointbert") -> PointBERTEncoder:
    """Construct the encoder and load ``state`` strictly, with a readable error on mismatch."""
    encoder = PointBERTEncoder(config, name=name)
    expected = encoder.model.state_dict()
    details = state_dict_mismatch(expected, state)
    if details:
        raise PointBERTCheckpointError(f"{name}: weights do not fit a {config.variant} PointBERT: {details}")
    encoder.model.load_state_dict(
        {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True
    )
    return encoder.eval().requires_grad_(False)


def load_ulip_pointbert(path: str | os.PathLike[str]) -> PointBERTEncoder:
    """Load the PointBERT encoder of a released ULIP-1/ULIP-2 checkpoint (or a re-saved one) on the CPU, float32."""
    path = Path(path)
    if not path.is_file():
        raise PointBERTCheckpointError(f"ULIP checkpoint not found: {path}")
    state = extract_point_encoder_state(_read_checkpoint(path), path.name)
    # Copy out of the (possibly memory-mapped) file so the rest of the checkpoint can be freed.
    state = {k: v.detach().clone() for k, v in state.items()}
    config = detect_config(state, path.name)
    encoder = build_pointbert(config, state, path.stem)
    logger.info(
        "Loaded ULIP PointBERT %s (%s: %d points x %d channels, depth %d, output %d)",
        path.name, config.variant, config.num_points, config.in_channels, config.depth, config.output_dim,
    )
    return encoder
