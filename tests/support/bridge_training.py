"""Builders for the bridge-trainer tests: tiny SD1.x- and SDXL-structured U-Nets, VAEs and PixArt transformers as
diffusers folders or as single files in the original (LDM / SGM) key layout, and generated image-caption data.

The LDM layout is written by inverting diffusers' conversion (the mapping of diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py``, generalised to any number of levels), so
the trainer's single-file loader — diffusers' ``convert_ldm_*_checkpoint`` — is exercised on real keys.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import nn

import support  # noqa: F401  (imports this repository as the package x2i)

# An SD1.x-structured U-Net, small: cross-attention down block, plain down block, mirrored up blocks.
TINY_UNET_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
}
# KL autoencoder downsampling by 4 (three levels): 32 px images -> 8x8 latents.
TINY_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [16, 32, 32], "latent_channels": 4,
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32, "scaling_factor": 0.18215,
}
# SDXL-structured U-Net, small: SDXL's real text context (2048) and its pooled-text + size embedding ("text_time",
# 1280 + 6 x 8), three levels as SDXL's (the first without attention), per-level transformer depths (1, 2: the
# middle block takes the last level's, as diffusers builds it), SDXL's heads of 64 channels and 32 norm groups, so
# that the config read back from a single file's shapes is exactly this one.
TINY_SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64, 64], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [1, 1, 1], "use_linear_projection": True,
    "cross_attention_dim": 2048, "norm_num_groups": 32, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 1280 + 6 * 8, "addition_embed_type_num_heads": 64,
}
# The tiny VAE with SDXL's latent scale, kept in float32 as SDXL's (force_upcast).
TINY_SDXL_VAE_CONFIG = {**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
# PixArt-alpha-structured transformer (learned sigma: 8 output channels), 2 blocks, 16 wide, 32-wide captions.
TINY_PIXART_CONFIG = {
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
    "sample_size": 8, "patch_size": 2, "caption_channels": 32, "cross_attention_dim": 16,
    "use_additional_conditions": False, "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000,
}


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides}).eval()


def tiny_vae(seed: int = 0, config: dict | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**(config or TINY_VAE_CONFIG)).eval()


def tiny_sdxl_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_SDXL_UNET_CONFIG, **overrides}).eval()


def tiny_pixart(seed: int = 0, **overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**{**TINY_PIXART_CONFIG, **overrides}).eval()


def make_sd1_folder(folder: Path, seed: int = 0, **unet_overrides) -> Path:
    """A diffusers SD1.x-style folder: ``unet/`` and ``vae/`` written with save_pretrained."""
    tiny_unet(seed, **unet_overrides).save_pretrained(folder / "unet")
    tiny_vae(seed + 1).save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def make_sdxl_folder(folder: Path, seed: int = 0, **unet_overrides) -> Path:
    """A diffusers SDXL-style folder: ``unet/`` (``addition_embed_type: "text_time"``) and ``vae/`` (scale 0.13025)."""
    tiny_sdxl_unet(seed, **unet_overrides).save_pretrained(folder / "unet")
    tiny_vae(seed + 1, TINY_SDXL_VAE_CONFIG).save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def make_pixart_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    """A diffusers PixArt-alpha-style folder: ``transformer/`` and ``vae/``."""
    tiny_pixart(seed, **overrides).save_pretrained(folder / "transformer")
    tiny_vae(seed + 1).save_pretrained(folder / "vae")
    return folder


# ---- the original (LDM) layout -------------------------------------------------------------------

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def ldm_unet_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel``'s weights under the LDM names (``input_blocks.N.M...``); an SDXL U-Net's
    ``add_embedding`` as the SGM layout's ``label_emb.0.0`` / ``label_emb.0.2`` (its transformer depths, per level,
    are whatever ``transformer_blocks.N`` the attention modules hold)."""
    config = unet.config
    levels, layers = len(config.block_out_channels), config.layers_per_block
    prefixes: list[tuple[str, str]] = [
        ("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
    ]
    prefixes += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(levels):
        down_attn = config.down_block_types[i].startswith("CrossAttn")
        up_attn = config.up_block_types[i].startswith("CrossAttn")
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."))
            if down_attn:
                prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1."))
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0."))
            if up_attn:
                prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1."))
        if i < levels - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op."))
            prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attn else 1}."))
    out = {}
    for key, value in unet.state_dict().items():
        new = key
        for hf, sd in sorted(prefixes, key=lambda p: -len(p[0])):
            if key.startswith(hf):
                rest = key[len(hf):]
                if "resnets" in hf:
                    for a, b in _RESNET:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                new = sd + rest
                break
        else:
            raise KeyError(f"no LDM name for {key}")
        out[new] = value
    return out


def ldm_vae_state(vae: nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL``'s weights under the LDM names (attention projections as 1x1 convs)."""
    levels, layers = len(vae.config.block_out_channels), vae.config.layers_per_block
    prefixes = [("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."), ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        prefixes.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    for i in range(levels):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(layers)]
        prefixes += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.") for j in range(layers + 1)]
        if i < levels - 1:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for hf, sd in sorted(prefixes, key=lambda p: -len(p[0])):
            if key.startswith(hf):
                rest = key[len(hf):].replace("conv_shortcut.", "nin_shortcut.")
                if "attentions" in hf:
                    for a, b in attention:
                        if rest.startswith(a):
                            rest = b + rest[len(a):]
                    if value.dim() == 2:
                        value = value[:, :, None, None]
                new = sd + rest
                break
        out[new] = value
    return out


def write_sd1_single_file(path: Path, seed: int = 0, with_vae: bool = True, extra: dict | None = None) -> tuple[Path, nn.Module, nn.Module]:
    """A tiny SD1.x-structured checkpoint in the original layout (``model.diffusion_model.*``,
    ``first_stage_model.*``) as safetensors; returns the path and the diffusers models it holds."""
    from safetensors.torch import save_file

    unet, vae = tiny_unet(seed), tiny_vae(seed + 1)
    tensors = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_state(unet).items()}
    if with_vae:
        tensors.update({f"first_stage_model.{k}": v for k, v in ldm_vae_state(vae).items()})
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path, unet, vae


def write_sdxl_single_file(path: Path, seed: int = 0, with_vae: bool = True, extra: dict | None = None,
                           **unet_overrides) -> tuple[Path, nn.Module, nn.Module]:
    """A tiny SDXL-structured checkpoint in the original SGM layout (``model.diffusion_model.*`` with ``label_emb``,
    ``first_stage_model.*``, and a stand-in for the ``conditioner.embedders.*`` text encoders, which the trainer
    never reads) as safetensors; returns the path and the diffusers models it holds."""
    from safetensors.torch import save_file

    unet, vae = tiny_sdxl_unet(seed, **unet_overrides), tiny_vae(seed + 1, TINY_SDXL_VAE_CONFIG)
    tensors = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_state(unet).items()}
    if with_vae:
        tensors.update({f"first_stage_model.{k}": v for k, v in ldm_vae_state(vae).items()})
    tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(8)
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path, unet, vae


# ---- the official positional order, written from its description -----------------------------------

def official_order(model: nn.Module, target_classes: set[str]) -> list[str]:
    """For each module (registration pre-order) whose class name is a target, each Linear / Conv2d
    descendant in named_modules() order: the order of the released lora_*.pt lists."""
    names = {id(m): n for n, m in model.named_modules()}
    return [
        names[id(m)]
        for ancestor in model.modules()
        if type(ancestor).__name__ in target_classes
        for _, m in ancestor.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


# ---- data ---------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (235, 220, 40)}
PLACES = ("left", "right")


def squares(count: int, size: int = 32, seed: int = 0) -> list[tuple["object", str]]:  # noqa: UP037
    """``count`` (PIL image, caption) pairs: a coloured square on the left or right of a grey canvas."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        place = PLACES[(i // len(COLOURS)) % len(PLACES)]
        image = Image.new("RGB", (size, size), (128, 128, 128))
        side = size // 2 + rng.randint(-2, 2)
        x0 = rng.randint(0, 2) if place == "left" else size - side - rng.randint(0, 2)
        y0 = rng.randint(0, size - side)
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=COLOURS[colour])
        out.append((image, f"a {colour} square on the {place}"))
    return out


def write_squares_tsv(folder: Path, count: int, size: int = 32, seed: int = 0, name: str = "pairs.tsv") -> Path:
    """Images under ``folder/images/`` and ``folder/<name>`` with relative ``images/N.png<TAB>caption`` lines."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(squares(count, size, seed)):
        image.save(folder / "images" / f"{seed}_{i}.png")
        lines.append(f"images/{seed}_{i}.png\t{caption}")
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / name


def write_squares_folder(folder: Path, count: int, size: int = 32, seed: int = 0) -> Path:
    """Images with sidecar captions: ``folder/N.png`` + ``folder/N.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(squares(count, size, seed)):
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def run_bridge(raw: dict, output: Path, task_class=None, **settings):
    """``(task, result)`` of a bridge run from ``raw`` into ``output`` (resuming what is there), with the bridge
    tests' run settings unless ``settings`` say otherwise; ``task_class``: a BridgeTask subclass."""
    from x2i.training import RunSettings, train
    from x2i.training.bridge_task import BridgeTask

    task = (task_class or BridgeTask).from_config(raw)
    values = {"batch_size": 8, "log_every": 1, "grad_clip": 1.0, "seed": 3, **settings}
    return task, train(task, RunSettings(output_dir=str(output), **values), resume="auto")


def run_metrics(output: Path, split: str, key: str) -> list[float]:
    """``key`` of every ``split`` row of a run's metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["split"] == split]
