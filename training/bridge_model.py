"""The model a LaVi-Bridge run trains: language model (+ text LoRA) → adapter → U-Net / PixArt (+ vision
LoRA), LoRA put in by peft on exactly the recipe's layers, and the optimiser over its three parts.

With SDXL the adapter also has a pooled head (:meth:`..bridge.adapter.TextAdapter.pooled`): SDXL's pooled text
vector made from the adapter's own tokens, trained by the same ε-MSE; the U-Net's six size numbers
(``time_ids``) come with each sample (:meth:`.image_data.CropGeometry.time_ids`)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..bridge.adapter import TextAdapter
from ..bridge.language_models import LaViBridgeRecipe, text_config
from ..bridge.lora import LoraTarget
from .bridge_settings import BridgeOptimSettings, resolved_learning_rates
from .diffusion_models import DiffusionModel
from .errors import TrainingError

ADAPTER_NAME = "default"


# ---------------------------------------------------------------------------------------------------
# LoRA (peft) on exact module names


def inject_lora(model: nn.Module, targets: Sequence[LoraTarget], rank: int, dropout: float) -> None:
    """peft LoRA on exactly ``targets`` (module names), alpha = rank, down ~ N(0, 1/rank), up = 0; afterwards
    only the LoRA weights of ``model`` are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    pattern = "^(?:" + "|".join(re.escape(t.name) for t in targets) + ")$"
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=pattern, init_lora_weights="gaussian", bias="none"
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    modules = dict(model.named_modules())
    for target in targets:
        layer = modules[target.name]
        if not hasattr(layer, "lora_A") or ADAPTER_NAME not in layer.lora_A:
            raise TrainingError(f"peft did not put a LoRA on {target.name}")
        layer.lora_A[ADAPTER_NAME].requires_grad_(True)
        layer.lora_B[ADAPTER_NAME].requires_grad_(True)
    injected = sum(1 for m in model.modules() if hasattr(m, "lora_A") and ADAPTER_NAME in getattr(m, "lora_A", {}))
    if injected != len(targets):
        raise TrainingError(f"peft put LoRA on {injected} layers, the recipe has {len(targets)}")


def lora_pairs(model: nn.Module, targets: Sequence[LoraTarget]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (up, down)}`` in the targets' (official) order, as the release stores them (scale 1.0)."""
    modules = dict(model.named_modules())
    out = {}
    for target in targets:
        layer = modules[target.name]
        if layer.scaling[ADAPTER_NAME] != 1.0:
            raise TrainingError(f"LoRA on {target.name} has scale {layer.scaling[ADAPTER_NAME]}, not 1.0")
        out[target.name] = (layer.lora_B[ADAPTER_NAME].weight.detach(), layer.lora_A[ADAPTER_NAME].weight.detach())
    return out


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (the base weights are frozen)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def zero_pairs(targets: Sequence[LoraTarget], rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All-zero pairs (no change to the model) for a released layout trained without that LoRA."""
    return [(torch.zeros(t.pair_shapes(rank)[0]), torch.zeros(t.pair_shapes(rank)[1])) for t in targets]


# ---------------------------------------------------------------------------------------------------
# The model the loop trains


class BridgeTrainingModel(nn.Module):
    """Language model (+ text LoRA) → adapter → U-Net / PixArt (+ vision LoRA); ``forward(batch)`` gives the
    ε-MSE of one training step. Frozen weights keep ``requires_grad=False`` (the loop checkpoints only
    the trainable ones)."""

    def __init__(
        self,
        language_model: nn.Module,
        adapter: TextAdapter,
        diffusion: DiffusionModel,
        recipe: LaViBridgeRecipe,
        train_text: bool,
    ) -> None:
        super().__init__()
        self.language_model = language_model
        self.adapter = adapter
        self.denoiser = diffusion.denoiser
        self.vae = diffusion.vae  # None when the latents come from the cache
        self.diffusion = _Plain(diffusion)
        self.recipe = recipe
        self.text = text_config(recipe)
        self.train_text = train_text
        self.num_timesteps = int(diffusion.scheduler.config.num_train_timesteps)

    def train(self, mode: bool = True) -> BridgeTrainingModel:
        """Dropout of the frozen base models stays off (T5 has 0.1): they are fixed feature extractors, as at
        inference; the LoRA dropout and the adapter's dropout train."""
        super().train(mode)
        if mode:
            for name, module in self.named_modules():
                if isinstance(module, nn.Dropout) and "lora_dropout" not in name and not name.startswith("adapter."):
                    module.eval()
            # Attention dropout that transformers applies functionally while the attention module trains (T5's
            # ``dropout``, Llama's ``attention_dropout``): no nn.Dropout to put in eval mode, so its rate goes to 0.
            for module in self.language_model.modules():
                for rate in ("dropout", "attention_dropout"):
                    if isinstance(getattr(module, rate, None), float):
                        setattr(module, rate, 0.0)
        return self

    # -- pieces ------------------------------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapter output (the diffusion model's context) and the mask the recipe passes on (PixArt) or None."""
        mask = attention_mask if self.text.use_attention_mask else None
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            if self.text.decoder_only:
                features = self.language_model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            else:
                features = self.language_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        param = next(self.adapter.parameters())
        return self.adapter(features.to(param.dtype)), mask

    def latents(self, batch: Mapping[str, torch.Tensor], train: bool) -> torch.Tensor:
        """Scaled VAE latents: training flips half the samples (official RandomHorizontalFlip) and samples
        the posterior; validation takes the unflipped posterior mean."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]  # [B, 2 (unflipped, flipped), C, h, w]
            rows = torch.arange(mean.shape[0], device=mean.device)
            pick = (torch.rand(mean.shape[0], device=mean.device) < 0.5).long() if train else torch.zeros_like(rows)
            mean, std = mean[rows, pick].float(), std[rows, pick].float()
            latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype) if train else mean
        else:
            if self.vae is None:
                raise TrainingError("the batch holds pixels but the model has no VAE (latent cache mismatch)")
            pixels = batch["pixels"]
            if train:
                flip = torch.rand(pixels.shape[0], device=pixels.device) < 0.5
                pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
            param = next(self.vae.parameters())
            # SDXL's VAE in float32 runs in float32 under the loop's bf16 autocast too (force_upcast).
            upcast = self.diffusion.value.kind == "sdxl" and param.dtype == torch.float32
            full = torch.autocast(pixels.device.type, enabled=False) if upcast else contextlib.nullcontext()
            with torch.no_grad(), full:
                posterior = self.vae.encode(pixels.to(param.dtype)).latent_dist
                latents = (posterior.sample() if train else posterior.mean).float()
        # Contiguous: a CPU VAE may hand back channels-last latents, and noise must not depend on memory layout.
        return latents.contiguous() * self.diffusion.value.scaling_factor

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample ε-MSE ``[B]``."""
        diffusion = self.diffusion.value
        noisy = diffusion.scheduler.add_noise(latents, noise, timesteps)
        context, mask = self.encode_text(batch["input_ids"], batch["attention_mask"])
        param = next(self.denoiser.parameters())
        sdxl = {}
        if diffusion.kind == "sdxl":
            if "time_ids" not in batch:
                raise TrainingError("an SDXL batch needs its time_ids (original size, crop, target size of each image)")
            sdxl = {"pooled": self.adapter.pooled(context).to(param.dtype), "time_ids": batch["time_ids"].float()}
        pred = diffusion.predict_noise(noisy.to(param.dtype), timesteps, context.to(param.dtype), mask, denoiser=self.denoiser, **sdxl)
        return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents = self.latents(batch, train=True)
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],), device=latents.device)
        return {"loss": self.loss(latents, noise, timesteps, batch).mean()}


class _Plain:
    """Holds an object out of ``nn.Module`` registration (its modules are registered on the model itself)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def build_bridge_optimizer(model: BridgeTrainingModel, optim: BridgeOptimSettings, kind: str) -> torch.optim.Optimizer:
    """AdamW over three groups — vision LoRA, adapter, text LoRA — with their learning rates."""
    vision_lr, adapter_lr, text_lr = resolved_learning_rates(optim, kind)
    groups = [
        {"params": [p for p in model.denoiser.parameters() if p.requires_grad], "lr": vision_lr, "name": "vision_lora"},
        {"params": [p for p in model.adapter.parameters() if p.requires_grad], "lr": adapter_lr, "name": "adapter"},
        {"params": [p for p in model.language_model.parameters() if p.requires_grad], "lr": text_lr, "name": "text_lora"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
