"""The model a U-ViT run trains: the U-ViT, its EMA and U-ViT's ``LSimple`` objective (see :mod:`.uvit_task`
for the recipe), the optimiser with its EMA update, and the warm-up schedule."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ..uvit import SamplingConvention, UViT, UViTConfig
from .uvit_settings import UViTOptimSettings


def uvit_alphas_cumprod(sampling: SamplingConvention | None = None) -> torch.Tensor:
    """ᾱ_n for n = 0..N in float64, ᾱ_0 = 1 (U-ViT's ``cum_alphas``): index n is U-ViT's time n and
    ComfyUI's discrete index n - 1."""
    s = sampling or SamplingConvention()
    if s.beta_schedule != "linear":
        raise ValueError(f"only SD's scaled-linear ('linear') schedule is implemented, not {s.beta_schedule!r}")
    betas = torch.linspace(s.linear_start**0.5, s.linear_end**0.5, s.num_timesteps, dtype=torch.float64) ** 2
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def buffer_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are buffers (same names, values, callable the same way):
    state that checkpoints hold and no optimiser or DDP reducer sees."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:  # a missing bias stays a None parameter, as the layer expects
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().clone())
    return clone


class UViTTrainingModel(nn.Module):
    """The U-ViT, its EMA (buffers) and the objective; ``forward(batch)`` is one training step's loss."""

    def __init__(
        self,
        uvit: UViT,
        empty_context: torch.Tensor,
        *,
        p_uncond: float = 0.1,
        ema_decay: float = 0.9999,
        latent_scale: float = SamplingConvention.latent_scale,
        random_flip: bool = False,
        sampling: SamplingConvention | None = None,
    ) -> None:
        super().__init__()
        sampling = sampling or SamplingConvention()
        self.uvit = uvit
        self.ema = buffer_copy(uvit)
        self.p_uncond = float(p_uncond)
        self.ema_decay = float(ema_decay)
        self.latent_scale = float(latent_scale)
        self.random_flip = random_flip
        self.num_timesteps = sampling.num_timesteps
        alphas_cumprod = uvit_alphas_cumprod(sampling)
        # Derived, not trained: rebuilt by the task, never checkpointed.
        self.register_buffer("sqrt_alpha_bar", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - alphas_cumprod).sqrt().float(), persistent=False)
        self.register_buffer("empty_context", empty_context.detach().float().clone(), persistent=False)
        self._pairs = [name for name, _ in uvit.named_parameters()]
        # DDP must not broadcast these every step: the EMA is updated identically on every process, the
        # others are constants.
        self._ddp_params_and_buffers_to_ignore = [f"ema.{name}" for name in self._pairs] + [
            "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "empty_context"]

    # -- pieces --------------------------------------------------------------------------------------------

    def latents(self, batch: Mapping[str, torch.Tensor], train: bool) -> torch.Tensor:
        """Scaled latents: training samples the posterior (and flips half when ``random_flip``); validation
        takes the unflipped posterior mean."""
        mean, std = batch["latent_mean"], batch["latent_std"]  # [B, 2 (unflipped, flipped), C, h, w]
        rows = torch.arange(mean.shape[0], device=mean.device)
        pick = torch.zeros_like(rows)
        if train and self.random_flip:
            pick = (torch.rand(mean.shape[0], device=mean.device) < 0.5).long()
        mean, std = mean[rows, pick].float(), std[rows, pick].float()
        if train:
            mean = mean + std * torch.randn(mean.shape, device=mean.device)
        return mean * self.latent_scale

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_n = √ᾱ_n z + √(1-ᾱ_n) ε for U-ViT times n in 1..N."""
        a = self.sqrt_alpha_bar[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha_bar[timesteps].view(-1, 1, 1, 1)
        return a * latents + s * noise

    def per_sample_loss(self, network: nn.Module, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                        context: torch.Tensor) -> torch.Tensor:
        """ε-MSE per sample ``[B]`` (float32) of ``network`` (the U-ViT or its EMA)."""
        prediction = network(self.noisy(latents, noise, timesteps), timesteps, context)
        return (prediction.float() - noise).pow(2).flatten(1).mean(1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents = self.latents(batch, train=True)
        count = latents.shape[0]
        timesteps = torch.randint(1, self.num_timesteps + 1, (count,), device=latents.device)
        noise = torch.randn(latents.shape, device=latents.device)
        context = batch["context"]
        drop = torch.rand(count, device=latents.device) < self.p_uncond
        context = torch.where(drop[:, None, None], self.empty_context.to(context.dtype), context)
        return {"loss": self.per_sample_loss(self.uvit, latents, noise, timesteps, context).mean()}

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema ← decay·ema + (1 - decay)·weights (U-ViT's ``ema``), after every optimiser step."""
        params = dict(self.uvit.named_parameters())
        buffers = dict(self.ema.named_buffers())
        torch._foreach_lerp_([buffers[n] for n in self._pairs], [params[n].detach() for n in self._pairs], 1.0 - self.ema_decay)


def build_uvit_optimizer(model: UViTTrainingModel, settings: UViTOptimSettings) -> torch.optim.Optimizer:
    """AdamW over every U-ViT weight (fused on CUDA), the EMA updated after each step."""
    params = list(model.uvit.parameters())
    fused = all(p.device.type == "cuda" for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay, fused=fused or None,
    )
    optimizer.register_step_post_hook(lambda *_: model.update_ema())
    return optimizer


def warmup_lambda(warmup_steps: int):
    """U-ViT's ``customized_lr_scheduler``: lr × min(step / warmup, 1) (the first step has lr 0)."""
    if warmup_steps <= 0:
        return lambda step: 1.0
    return lambda step: min(step / warmup_steps, 1.0)


def random_batch(config: UViTConfig, batch: int, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the caches give it (fp16 latent moments for both flips, fp16 CLIP features), random: for benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch, 2, config.in_channels, config.image_size, config.image_size)
    return {
        "latent_mean": (4 * torch.randn(size, generator=generator)).half().to(device),
        "latent_std": (0.05 * torch.rand(size, generator=generator)).half().to(device),
        "context": torch.randn(batch, config.text_tokens, config.context_dim, generator=generator).half().to(device),
    }
