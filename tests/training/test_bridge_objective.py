"""The bridge trainer's step is LaVi-Bridge's: one training step of the pack (``BridgeTrainingModel``: the
loss, the gradient of every trainable tensor, one AdamW update of the task's optimiser) equals a line-by-line
transcription of the official training step on the same tiny models, batch and seed.

The official step is ``train/t5_unet.py`` and ``train/t5_transformer.py`` of ShihaoZhaoZSH/LaVi-Bridge at
commit 5a725f379f153991b36f307e099de01500f364c2 (the commit of tests/data/lavibridge_golden.md): only the
step logic is transcribed below (the flip of the dataset's transform, VAE posterior sample × 0.18215,
``randn_like`` noise, uniform ``randint`` timesteps, ``DDPMScheduler.add_noise`` with the schedule of the
recipe's ``scheduler/`` config written out, the tokeniser call, the language model, ``TextAdapter``, the
denoiser, MSE on ε; the optimiser's groups), with the official ``LoraInjectedLinear`` / ``LoraInjectedConv2d``
forward and ``TextAdapter`` (``modules/lora.py``, ``modules/adapters.py``) on the official layers.

Dropout is off on both sides (``eval()``): no two implementations draw the same dropout masks. The
official script trains with ``text_encoder.train()`` (T5's own dropout 0.1 on) and puts the LoRA
dropout after ``lora_up``; the pack keeps the frozen models' dropout off and peft puts it on the LoRA
input (see the report of this test's change).
"""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

import support.bridge_training as bt
from x2i.training import Distributed
from x2i.training.bridge_task import BridgeTask

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 4


# ---- transcribed from the official modules (modules/lora.py, modules/adapters.py) -----------------------


class OfficialLoraLinear(nn.Module):  # LoraInjectedLinear.forward, scale 1.0 (dropout off: eval)
    def __init__(self, linear: nn.Linear, r: int) -> None:
        super().__init__()
        self.linear = linear
        self.lora_down = nn.Linear(linear.in_features, r, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.lora_up = nn.Linear(r, linear.out_features, bias=False)
        self.scale = 1.0
        self.selector = nn.Identity()

    def forward(self, input):
        return self.linear(input) + self.dropout(self.lora_up(self.selector(self.lora_down(input)))) * self.scale


class OfficialLoraConv2d(nn.Module):  # LoraInjectedConv2d.forward
    def __init__(self, conv: nn.Conv2d, r: int) -> None:
        super().__init__()
        self.conv = conv
        self.lora_down = nn.Conv2d(conv.in_channels, r, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.lora_up = nn.Conv2d(r, conv.out_channels, kernel_size=1, stride=1, padding=0, bias=False)
        self.selector = nn.Identity()
        self.scale = 1.0

    def forward(self, input):
        return self.conv(input) + self.dropout(self.lora_up(self.selector(self.lora_down(input)))) * self.scale


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out, mult=4, dropout=0.1):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class OfficialTextAdapter(nn.Module):
    def __init__(self, in_dim, int_dim, out_dim):
        super().__init__()
        self.in_dim = in_dim
        self.ff1 = FeedForward(in_dim, int_dim)
        self.ff2 = FeedForward(int_dim, out_dim)
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(int_dim)

    def forward(self, x):
        x = self.ff1(self.norm1(x))
        x = self.ff2(self.norm2(x))
        return x  # TextAdapterOutput(x).sample


def inject_official_lora(model: nn.Module, target_classes: set[str], r: int) -> list[str]:
    """The official injection (each Linear / Conv2d under a module of a target class, in traversal order),
    with fresh LoRA weights that the test then copies from the pack's; returns the injected names."""
    names = bt.official_order(model, target_classes)
    modules = dict(model.named_modules())
    for name in names:
        parent, _, leaf = name.rpartition(".")
        layer = modules[name]
        wrapped = OfficialLoraLinear(layer, r) if isinstance(layer, nn.Linear) else OfficialLoraConv2d(layer, r)
        setattr(modules[parent], leaf, wrapped)
    return names


# ---- the official training step (train/t5_unet.py, train/t5_transformer.py: the loop body) --------------

# DDPMScheduler.from_pretrained(<model>, subfolder="scheduler"): CompVis/stable-diffusion-v1-4's config
# (scaled_linear 0.00085 -> 0.012) and PixArt-alpha/PixArt-XL-2-512x512's (linear 0.0001 -> 0.02), 1000 steps.
OFFICIAL_SCHEDULES = {"sd1": ("scaled_linear", 0.00085, 0.012), "pixart": ("linear", 0.0001, 0.02)}
NUM_TRAIN_TIMESTEPS = 1000


def official_alphas_cumprod(kind: str) -> torch.Tensor:
    schedule, beta_start, beta_end = OFFICIAL_SCHEDULES[kind]
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    else:  # "scaled_linear"
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def official_add_noise(kind: str, original_samples, noise, timesteps):  # DDPMScheduler.add_noise
    alphas_cumprod = official_alphas_cumprod(kind).to(dtype=original_samples.dtype)
    sqrt_alpha_prod = (alphas_cumprod[timesteps] ** 0.5).flatten()[:, None, None, None]
    sqrt_one_minus_alpha_prod = ((1 - alphas_cumprod[timesteps]) ** 0.5).flatten()[:, None, None, None]
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def official_step(kind, vae, vis, text_encoder, adapter, tokenizer, images, prompts):
    # The dataset's transforms.RandomHorizontalFlip(): `if torch.rand(1) < p: hflip`, one draw per sample.
    images = torch.stack([image.flip(-1) if torch.rand(1) < 0.5 else image for image in images])
    # Latent preparation
    latents = vae.encode(images).latent_dist.sample()
    latents = latents * 0.18215
    # diffusers' CPU VAE hands back channels-last latents, where randn_like would lay the same draws out in
    # another order (on the official GPU they come back contiguous): the draws are compared in one layout.
    latents = latents.contiguous()
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), device=latents.device)
    timesteps = timesteps.long()
    # Model prediction
    noisy_latents = official_add_noise(kind, latents, noise, timesteps)
    if kind == "sd1":  # train/t5_unet.py
        text_input = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt", truncation=True).input_ids
        encoder_hidden_states_pre = text_encoder(text_input)[0]
        encoder_hidden_states = adapter(encoder_hidden_states_pre)
        model_pred = vis(noisy_latents, timesteps, encoder_hidden_states).sample
    else:  # train/t5_transformer.py
        text_inputs = tokenizer(prompts, padding="max_length", max_length=120, add_special_tokens=True, return_tensors="pt",
                                truncation=True)
        prompt_attention_mask = text_inputs.attention_mask
        encoder_hidden_states_pre = text_encoder(text_inputs.input_ids, attention_mask=prompt_attention_mask)[0]
        encoder_hidden_states = adapter(encoder_hidden_states_pre)
        model_pred = vis(noisy_latents, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=prompt_attention_mask,
                         timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        model_pred = model_pred.chunk(2, dim=1)[0]
    # Optimization
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


# Official optimiser groups: (vision LoRA, text LoRA, adapter) learning rates, AdamW(betas, wd, eps).
OFFICIAL_LR = {"sd1": (1e-4, 5e-6, 1e-4), "pixart": (2e-5, 5e-6, 2e-5)}


# ---- the comparison ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squares_tsv(tmp_path_factory):
    return bt.write_squares_tsv(tmp_path_factory.mktemp("squares"), 12)


@pytest.mark.parametrize("kind", ["sd1", "pixart"])
def test_one_step_equals_the_official_training_step(kind, tmp_path, tiny_t5, squares_tsv):
    diffusion = bt.make_sd1_folder(tmp_path / "sd") if kind == "sd1" else bt.make_pixart_folder(tmp_path / "pixart")
    raw = {"data": {"source": str(squares_tsv), "resolution": 32, "validation_count": 4},
           "model": {"diffusion_model": str(diffusion), "language_model": str(tiny_t5)},
           "lora": {"rank": 4}, "export": {"name": "step"}}
    task = BridgeTask.from_config(raw)  # the official settings otherwise: learning rates, AdamW, rank
    task.prepare(Distributed(), logging.getLogger("test"))
    official_vis, official_text = copy.deepcopy(task.diffusion.denoiser), copy.deepcopy(task.language_model)
    torch.manual_seed(0)
    model = task.build_model(Distributed())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the initialisation (up = 0 would leave every down gradient zero)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)

    # The official models, with the same weights: the official injection on the official classes.
    vision_classes = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"} if kind == "sd1" else {"Attention", "GEGLU"}
    names = {"denoiser": inject_official_lora(official_vis, vision_classes, 4),
             "language_model": inject_official_lora(official_text, {"T5Attention"}, 4)}
    config = model.adapter.config
    official_adapter = OfficialTextAdapter(config.in_dim, config.int_dim, config.out_dim)
    official_adapter.load_state_dict(model.adapter.state_dict())
    official = {"denoiser": official_vis, "language_model": official_text}
    ours = dict(model.named_parameters())
    pairs = []  # (pack parameter name, official parameter)
    for part, injected in names.items():
        modules = dict(official[part].named_modules())
        for name in injected:
            for peft, theirs in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
                mine = f"{part}.{name}.{peft}.default.weight"
                getattr(modules[name], theirs).weight.data.copy_(ours[mine].detach())
                pairs.append((mine, getattr(modules[name], theirs).weight))
    pairs += [(f"adapter.{k}", v) for k, v in official_adapter.named_parameters()]
    trainable = {k for k, p in ours.items() if p.requires_grad}
    assert {mine for mine, _ in pairs} == trainable  # every trainable tensor compared, and nothing else trains

    train = task.train_dataset()
    batch = task.collate([train[i] for i in range(BATCH)])
    prompts = [train.dataset.items[train.indices[i]].caption for i in range(BATCH)]
    images = list(batch["pixels"])  # the official transform (test_bridge_data), before its RandomHorizontalFlip
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)

    model.eval()
    for module in (official_vis, official_text, official_adapter):
        module.eval()
    torch.manual_seed(7)
    loss = model(batch)["loss"]
    torch.manual_seed(7)
    expected = official_step(kind, model.vae, official_vis, official_text, official_adapter, tokenizer, images, prompts)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert loss.item() > 0.1
    loss.backward()
    expected.backward()
    for mine, theirs in pairs:
        assert ours[mine].grad is not None and theirs.grad is not None, mine
        # The same operations in the same order: equal to float32 rounding, relative to each tensor's scale.
        error = (ours[mine].grad - theirs.grad).abs().max().item()
        assert error <= 1e-6 * theirs.grad.abs().max().item(), f"{mine}: gradient differs by {error:.3g}"
    assert all(ours[mine].grad.abs().sum() > 0 for mine in trainable)

    # One optimiser step: the task's AdamW against the official groups (vision LoRA, text LoRA, adapter).
    vision_lr, text_lr, adapter_lr = OFFICIAL_LR[kind]
    theirs_by_part = {part: [p for mine, p in pairs if mine.startswith(part)] for part in ("denoiser", "language_model", "adapter")}
    official_optimizer = torch.optim.AdamW([
        {"params": itertools.chain(theirs_by_part["denoiser"]), "lr": vision_lr},
        {"params": itertools.chain(theirs_by_part["language_model"]), "lr": text_lr},
        {"params": official_adapter.parameters(), "lr": adapter_lr},
    ], lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    task.build_optimizer(model).step()
    official_optimizer.step()
    for mine, theirs in pairs:
        torch.testing.assert_close(ours[mine].detach(), theirs.detach(), rtol=1e-5, atol=1e-7, msg=lambda m, mine=mine: f"{mine}: {m}")
