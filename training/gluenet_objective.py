"""GlueGen's GlueNet objective (paper §3, official ``train_gluenet_multi.py`` / ``train_gluenet_sound_text.py``).

For source features ``s`` (frozen new encoder) and target features ``c`` (frozen CLIP, raw SD1
conditioning) of one global batch:

- student input ``x = s / input_divisor`` (3 for XLM-R, "over3"); target ``t = c / (tensor_norm / 2)``
  ("overnorm"); ``y = GlueNet(x)``;
- token weights: ``M = mean_batch(c)`` ``[77, D]``, ``w_i = mean_d |M_i - M_76|``, ``w /= mean(w)``,
  then ``w_76 = (w_75 + w_74) / 2`` (the last token's own distance is 0);
- ``L_mse = 1e4 * mean((y - t)^2 * w)`` (``w`` per token), ``L_rec = 1e4 * mean((decoder(y) - x)^2)``
  with a decoder of the reverse shape, and ``L_adv = 0.1 * [NLL(D(c_tokens), 0) + NLL(D(y_tokens), 1)]``
  where ``D`` is a token discriminator behind a gradient-reversal layer (λ = 0.1): it learns to tell
  CLIP tokens from GlueNet tokens while the GlueNet learns to fool it.

For an SDXL GlueNet the target also holds SDXL's pooled vector ``p`` (:func:`training.targets.unpack_target`);
its pooled head adds ``L_pooled = 1e4 * mean((head(sg(y)) - p / pooled_norm)^2)``, the token MSE's form and weight on
a target of the same unit scale (``pooled_norm``: the mean norm of the training set's pooled vectors), trained on the
GlueNet's tokens without reshaping them (``sg``: stop-gradient), and
``tensor_norm`` is measured on the SDXL targets as GlueGen measured CLIP's (:func:`gluenet.scaling.per_token_norm`).

The discriminator sees the *raw* CLIP tokens in the official multilingual script and the *scaled*
ones (``t``) in the sound script; ``discriminator_target = "auto"`` follows each.

Distributed training equals one process on the same global batch: every loss is a mean over the
local batch (DDP averages equal shares), the token-weight batch mean is all-reduced, and the
discriminator's BatchNorm takes its statistics over the global batch (:class:`GlobalBatchNorm1d`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..gluenet import GlueNet, GlueNetConfig
from ..gluenet.scaling import clip_tensor_norm
from .settings import setting
from .targets import unpack_target

MeanFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GlueNetLossSettings:
    """The ``[loss]`` section; defaults are the official ones."""

    mse: bool = setting(True, "the (token-weighted) MSE to CLIP's features")
    mse_weight: float = setting(1e4, "its weight")
    token_weighting: bool = setting(True, "weigh tokens by their distance to the last token (official)")
    reconstruction: bool = setting(True, "a decoder must recover the source features from the GlueNet's output")
    reconstruction_weight: float = setting(1e4, "its weight")
    adversarial: bool = setting(True, "a token discriminator behind gradient reversal (CLIP tokens vs GlueNet tokens)")
    adversarial_weight: float = setting(0.1, "its weight")
    gradient_reversal: float = setting(0.1, "lambda of the gradient-reversal layer")
    pooled_weight: float = setting(1e4, "weight of the pooled head's MSE (SDXL GlueNets; unused for SD1.x)")
    discriminator_target: Literal["auto", "raw", "scaled"] = setting(
        "auto", "CLIP tokens the discriminator sees: auto = raw for text, scaled for sound/point clouds (as the official scripts)")

    def __post_init__(self) -> None:
        if not (self.mse or self.reconstruction or self.adversarial):
            raise ValueError("at least one of loss.mse, loss.reconstruction, loss.adversarial must be on")
        for name in ("mse_weight", "reconstruction_weight", "adversarial_weight", "gradient_reversal", "pooled_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``-lambda`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.lambd, None


def gradient_reversal(x: torch.Tensor, lambd: float) -> torch.Tensor:
    return _GradientReversal.apply(x, lambd)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics cover the whole global batch of a distributed run.

    ``torch.nn.SyncBatchNorm`` does this, but only for CUDA/XPU tensors: on CPU (gloo) it raises
    "SyncBatchNorm expected input tensor to be on GPU". This module all-reduces the per-channel sum
    and the centred sum of squares with ``torch.distributed.nn.functional.all_reduce`` (differentiable,
    so gradients flow through the statistics to every rank, as in SyncBatchNorm) and normalises with
    them; in one process, or in eval mode, it is plain ``BatchNorm1d``. Same parameters and buffers
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``).
    Statistics are computed in float32 whatever the autocast dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = _world_size()
        if not self.training or world == 1:
            return super().forward(x.float())
        from torch.distributed.nn.functional import all_reduce

        x = x.float()
        count = torch.tensor([float(x.shape[0])], device=x.device)
        total = all_reduce(torch.cat([x.sum(dim=0), count]))  # [C + 1]: sums and the global count
        n = total[-1]
        mean = total[:-1] / n
        var = all_reduce(((x - mean) ** 2).sum(dim=0)) / n
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * n.detach() / (n.detach() - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return y


class TokenDiscriminator(nn.Module):
    """The official ``Discriminator(dim, 2)``: ``Linear(dim, dim/4) → BatchNorm → ReLU → Linear(dim/4, 2) →
    LogSoftmax``, behind a gradient-reversal layer; keys ``net.0``, ``net.1``, ``net.3``."""

    def __init__(self, dim: int, reversal: float = 0.1) -> None:
        super().__init__()
        inner = int(dim * 0.25)
        self.reversal = reversal
        self.net = nn.Sequential(
            nn.Linear(dim, inner), GlobalBatchNorm1d(inner), nn.ReLU(inplace=True), nn.Linear(inner, 2), nn.LogSoftmax(dim=1)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(gradient_reversal(tokens, self.reversal))


def token_weights(target_raw: torch.Tensor, batch_mean: MeanFn | None = None) -> torch.Tensor:
    """Official token re-weighting from the raw CLIP targets ``[B, T, D]`` → ``[T]``.

    ``batch_mean`` turns this process's batch mean into the global one (``Distributed.all_reduce_mean``)."""
    mean = target_raw.detach().float().mean(dim=0)
    if batch_mean is not None:
        mean = batch_mean(mean)
    weights = (mean - mean[-1]).abs().mean(dim=1)
    weights = weights / weights.mean()
    weights[-1] = (weights[-2] + weights[-3]) / 2
    return weights


def decoder_config(encoder: GlueNetConfig) -> GlueNetConfig:
    """The reconstruction decoder: the encoder's architecture with input and output swapped
    (official: ``Translator_noln(77, 768, 1024, 2, 5)``; sound ``Translator_w_head_v0(77, 16, 768, 64, 4, 5)``)."""
    if encoder.architecture == "translator_w_head":
        return GlueNetConfig(
            "translator_w_head", num_tokens=encoder.tokens_out, num_tokens_out=encoder.num_tokens, in_dim=encoder.out_dim,
            out_dim=encoder.in_dim, mult=encoder.mult, depth=encoder.depth, output_scaling="none",
        )
    return GlueNetConfig(
        encoder.architecture, num_tokens=encoder.num_tokens, in_dim=encoder.out_dim, out_dim=encoder.in_dim,
        mult=encoder.mult, depth=encoder.depth, attn_heads=encoder.attn_heads, attn_dim_head=encoder.attn_dim_head,
        output_scaling="none",
    )


class GlueNetObjective(nn.Module):
    """The trainable networks and the loss. ``forward(batch)`` returns ``{"loss", "mse", "reconstruction",
    "adversarial"}`` (the last three detached, weighted as they enter the loss).

    ``batch``: ``source`` ``[B, T_in, D_in]``, or ``[B, T_in * D_in]`` embeddings (reshaped row-major
    as GlueGen does), and ``target`` ``[B, 77, D]``, the raw CLIP features (SDXL: ``[B, 78, 2048]``, the tokens
    and the pooled vector packed by :func:`training.targets.pack_target`). With a pooled head the result also
    has ``"pooled"``.
    """

    def __init__(self, config: GlueNetConfig, loss: GlueNetLossSettings, modality: str = "text",
                 batch_mean: MeanFn | None = None) -> None:
        super().__init__()
        self.config = config
        self.settings = loss
        self.batch_mean = batch_mean
        self.encoder = GlueNet(config)
        self.decoder = GlueNet(decoder_config(config)) if loss.reconstruction else None
        self.discriminator = TokenDiscriminator(config.out_dim, loss.gradient_reversal) if loss.adversarial else None
        choice = loss.discriminator_target
        self.discriminator_sees_raw = (modality == "text") if choice == "auto" else choice == "raw"
        self.register_buffer("target_scale", clip_tensor_norm(config.output_norm) / 2, persistent=False)  # [77, 1]

    def student_input(self, source: torch.Tensor) -> torch.Tensor:
        x = source.float()
        if x.ndim == 2:
            x = x.reshape(x.shape[0], *self.encoder.input_shape)
        return x / self.config.input_divisor

    def scaled_target(self, target_raw: torch.Tensor) -> torch.Tensor:
        return target_raw.float() / self.target_scale

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        settings = self.settings
        target_raw, pooled = unpack_target(batch["target"].float(), self.config.pooled_dim)
        x = self.student_input(batch["source"])
        t = self.scaled_target(target_raw)
        y = self.encoder(x).float()
        zero = y.new_zeros(())
        terms = {"mse": zero, "reconstruction": zero, "adversarial": zero}
        if pooled is not None:
            # A read-out of the tokens, not a second target for them: with its gradient flowing into the GlueNet,
            # the pooled MSE held the token MSE at 4x its value without it (a 2048-wide toy SDXL target, 100 steps).
            predicted = self.encoder.pooled_head(y.detach()).float()
            terms["pooled"] = settings.pooled_weight * ((predicted - pooled / self.config.pooled_norm) ** 2).mean()
        if settings.mse:
            squared = (y - t) ** 2
            if settings.token_weighting:
                squared = squared * token_weights(target_raw, self.batch_mean)[None, :, None]
            terms["mse"] = settings.mse_weight * squared.mean()
        if self.decoder is not None:
            terms["reconstruction"] = settings.reconstruction_weight * ((self.decoder(y).float() - x) ** 2).mean()
        if self.discriminator is not None:
            width = y.shape[-1]
            real = (target_raw if self.discriminator_sees_raw else t).reshape(-1, width)
            fake = y.reshape(-1, width)
            real_labels = torch.zeros(real.shape[0], dtype=torch.long, device=y.device)
            fake_labels = torch.ones(fake.shape[0], dtype=torch.long, device=y.device)
            terms["adversarial"] = settings.adversarial_weight * (
                F.nll_loss(self.discriminator(real).float(), real_labels) + F.nll_loss(self.discriminator(fake).float(), fake_labels)
            )
        loss = sum(terms.values())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


@torch.no_grad()
def alignment_metrics(aligned: torch.Tensor, targets: torch.Tensor, target_ids: torch.Tensor) -> dict[str, float]:
    """Validation metrics in SD1 conditioning space.

    ``aligned`` ``[N, T, D]``: GlueNet outputs (``translate``, scaled back); ``targets`` ``[G, T, D]``:
    the distinct targets; ``target_ids`` ``[N]``: which target each sample should reach.

    - ``mse``: mean squared error to the sample's target;
    - ``cosine``: mean per-token cosine similarity to it;
    - ``retrieval_top1``: share of samples whose nearest target (cosine of the flattened ``T x D``
      sequences, centred on the targets' mean) is their own; ``retrieval_chance`` = 1 / G for reference.
    """
    aligned, targets = aligned.float(), targets.float()
    own = targets[target_ids]
    mse = ((aligned - own) ** 2).mean()
    cosine = F.cosine_similarity(aligned, own, dim=-1).mean()
    # Cosine of mean-centred sequences: what every target shares (the start token, the padding
    # positions) would otherwise dominate the similarity and hide the differences that matter.
    centre = targets.flatten(1).mean(dim=0)
    sims = F.normalize(aligned.flatten(1) - centre, dim=1) @ F.normalize(targets.flatten(1) - centre, dim=1).T
    top1 = (sims.argmax(dim=1) == target_ids).float().mean()
    return {"mse": float(mse), "cosine": float(cosine), "retrieval_top1": float(top1), "retrieval_chance": 1.0 / targets.shape[0]}


@torch.no_grad()
def pooled_metrics(pooled: torch.Tensor, targets: torch.Tensor, target_ids: torch.Tensor) -> dict[str, float]:
    """SDXL's pooled vector: ``pooled_mse`` and ``pooled_cosine`` to each sample's target (``targets`` ``[G, P]``)."""
    own = targets.float()[target_ids]
    return {"pooled_mse": float(((pooled.float() - own) ** 2).mean()),
            "pooled_cosine": float(F.cosine_similarity(pooled.float(), own, dim=-1).mean())}
