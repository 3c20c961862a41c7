"""SDXL's text conditioning as a GlueNet target: exactly what ComfyUI's CLIPTextEncode gives an SDXL base model.

ComfyUI (``comfy/sdxl_clip.py`` ``SDXLClipModel``, built on ``comfy/sd1_clip.py`` ``SDClipModel``) runs two
encoders on the same caption:

- CLIP ViT-L/14 (``clip_l``): the tokens padded with the end token (``SDTokenizer``);
- OpenCLIP ViT-bigG/14 (``clip_g``): the same tokens padded with id 0 (``SDXLClipGTokenizer``,
  ``pad_with_end=False``);

both without an attention mask (``enable_attention_masks=False``; CLIP's causal mask hides the padding),
each giving its penultimate layer (``layer="hidden"``, ``layer_idx=-2``) without the final LayerNorm
(``layer_norm_hidden_state=False``), concatenated along the width: 768 + 1280 = ``[77, 2048]`` tokens. The
pooled vector SDXL's ADM input takes is bigG's ``text_projection`` of its final-LayerNormed last layer at the
first end token (``return_projected_pooled=True``; ComfyUI's ``num_tokens - 1``): ``[1280]``.

Captions are tokenised to 77 tokens (start, at most 75, end) and longer ones truncated, as the SD1 target
is; ComfyUI would encode the rest in further 75-token windows, which a GlueNet target does not model.

The weights come from an SDXL **base** single file in the original SGM layout, the one ComfyUI's
``supported_models.SDXL.process_clip_state_dict`` reads, and only those keys are read: CLIP-L under
``conditioner.embedders.0.transformer.`` (transformers names), bigG under ``conditioner.embedders.1.model.``
(open_clip names, renamed by :func:`open_clip_to_transformers`: a dozen exact lines, simpler than diffusers'
``convert_open_clip_checkpoint``, which needs diffusers and a built model and splits the attention by the
projection width rather than the model width). The models are transformers' ``CLIPTextModel`` (quick GELU)
and ``CLIPTextModelWithProjection`` (GELU), configured from the shapes. The tokenizer is CLIP's
(``target.tokenizer``, by default ComfyUI's ``comfy/sd1_tokenizer``, which ComfyUI uses for both encoders).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..weights import describe_keys
from .targets import (
    SD1_CLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    TARGET_TOKENS,
    TargetError,
    _load_tokenizer,
    _read_checkpoint_tensors,
    clip_config_from_state,
    load_clip_weights,
)

logger = logging.getLogger(__name__)

# open_clip's names -> transformers' (below text_model.; in a block: below transformer.resblocks.N. / encoder.layers.N.).
_TOWER_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
                "positional_embedding": "embeddings.position_embedding.weight",
                "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_RESBLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Kept by open_clip beside the text tower and unused by the conditioning.
_OPEN_CLIP_UNUSED = ("logit_scale", "attn_mask")


def open_clip_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip text tower (keys below its model prefix) as ``CLIPTextModelWithProjection`` keys:
    ``text_model.*`` with ``in_proj`` split into q/k/v (thirds of the model width), and ``text_projection``
    (stored ``[width, proj]``, used as ``x @ text_projection``) transposed into ``text_projection.weight``.
    Keys it does not know are kept, so the load names them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_UNUSED:
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key in _TOWER_NAMES:
            out[f"text_model.{_TOWER_NAMES[key]}"] = value
        elif match := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"text_model.encoder.layers.{match.group(1)}.self_attn.{name}.{match.group(2)}"] = part.contiguous()
        elif (match := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)) and match.group(2) in _RESBLOCK_NAMES:
            out[f"text_model.encoder.layers.{match.group(1)}.{_RESBLOCK_NAMES[match.group(2)]}.{match.group(3)}"] = value
        else:
            out[key] = value
    return out


class SDXLTextTarget(nn.Module):
    """SDXL's two text encoders and CLIP's tokenizer: captions to ComfyUI's SDXL conditioning,
    ``tokens [B, 77, 2048]`` and ``pooled [B, 1280]`` (see the module docstring)."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, tokenizer, name: str, max_length: int = TARGET_TOKENS) -> None:
        super().__init__()
        self.clip_l = clip_l  # transformers CLIPTextModel
        self.clip_g = clip_g  # transformers CLIPTextModelWithProjection
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length

    @property
    def hidden_size(self) -> int:
        return int(self.clip_l.config.hidden_size + self.clip_g.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return int(self.clip_g.config.projection_dim)

    @property
    def item_shape(self) -> tuple[int, int]:
        """One caption's feature-cache item: the tokens plus the packed pooled row (:func:`targets.pack_target`)."""
        return (self.max_length + 1, self.hidden_size)

    def token_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids_l, ids_g)``, ``[B, 77]`` each: the same tokens, L's padded with the end token, bigG's with 0."""
        rows = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        ids_l = torch.full((len(rows), self.max_length), int(self.tokenizer.eos_token_id), dtype=torch.long)
        ids_g = torch.zeros((len(rows), self.max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids_l[i, : len(row)] = torch.tensor(row)
            ids_g[i, : len(row)] = torch.tensor(row)
        return ids_l, ids_g

    def forward(self, ids_l: torch.Tensor, ids_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, 77, 2048], pooled [B, 1280])`` in the encoders' dtype for token ids of :meth:`token_ids`."""
        hidden_l = self.clip_l(input_ids=ids_l, output_hidden_states=True).hidden_states[-2]
        out_g = self.clip_g.text_model(input_ids=ids_g, output_hidden_states=True)
        first_end = (ids_g == int(self.tokenizer.eos_token_id)).int().argmax(dim=-1)
        pooled = self.clip_g.text_projection(out_g.last_hidden_state[torch.arange(ids_g.shape[0], device=ids_g.device), first_end])
        return torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1), pooled

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, 77, 2048], pooled [B, 1280])`` float32 on the encoders' device."""
        device = next(self.parameters()).device
        ids_l, ids_g = self.token_ids(texts)
        tokens, pooled = self(ids_l.to(device), ids_g.to(device))
        return tokens.float(), pooled.float()


def _sdxl_encoder_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CLIP-L (keys below ``text_model.``) and bigG (open_clip keys) of an SDXL base file, or the refusal
    that says what the file is instead."""
    fix = "Convert a trusted checkpoint to .safetensors."
    keys, state = _read_checkpoint_tensors(path, (SDXL_CLIP_L_PREFIX, SDXL_CLIP_G_PREFIX), fix)
    clip_l = {k[len(SDXL_CLIP_L_PREFIX):].removeprefix("text_model."): v for k, v in state.items() if k.startswith(SDXL_CLIP_L_PREFIX)}
    clip_g = {k[len(SDXL_CLIP_G_PREFIX):]: v for k, v in state.items() if k.startswith(SDXL_CLIP_G_PREFIX)}
    if not clip_l and any(k.startswith(SDXL_REFINER_CLIP_G_PREFIX) for k in keys):
        raise TargetError(
            f"{path.name} is an SDXL refiner checkpoint (OpenCLIP ViT-bigG alone under '{SDXL_REFINER_CLIP_G_PREFIX}', no "
            "CLIP ViT-L): the refiner's conditioning is 1280-wide bigG only, not the base model's 2048-wide one. "
            "Use an SDXL base checkpoint (e.g. sd_xl_base_1.0.safetensors) as target.clip"
        )
    if not clip_l and not clip_g:
        if any(k.startswith(SD1_CLIP_PREFIX) for k in keys):
            raise TargetError(
                f"{path.name} is an SD1.x checkpoint (its text encoder is under '{SD1_CLIP_PREFIX}'), but target.kind = "
                "\"sdxl\": SDXL targets come from an SDXL single file (text encoders under 'conditioner.embedders.'). "
                "Point target.clip at an SDXL base checkpoint, or set target.kind = \"sd1\""
            )
        raise TargetError(
            f"{path.name} has no SDXL text encoders (no '{SDXL_CLIP_L_PREFIX}*' or '{SDXL_CLIP_G_PREFIX}*' keys; found "
            f"{describe_keys(keys)}). SDXL targets come from an SDXL base single file: point target.clip at one"
        )
    if not clip_g:
        raise TargetError(
            f"{path.name} has SDXL's CLIP ViT-L but not its OpenCLIP ViT-bigG (no '{SDXL_CLIP_G_PREFIX}*' keys): SDXL "
            "conditioning needs both encoders, so the file is incomplete (a CLIP-L-only extract?). Use a complete SDXL "
            "base checkpoint as target.clip"
        )
    if not clip_l:
        raise TargetError(
            f"{path.name} has SDXL's OpenCLIP ViT-bigG but not its CLIP ViT-L (no '{SDXL_CLIP_L_PREFIX}*' keys): SDXL "
            "conditioning needs both encoders. Use a complete SDXL base checkpoint as target.clip"
        )
    return clip_l, clip_g


def load_sdxl_target(path: Path, tokenizer_folder: str = "", dtype: torch.dtype = torch.float32,
                     pack_root: Path | None = None) -> SDXLTextTarget:
    """SDXL's two text encoders from an SDXL base single file (``.safetensors``, or a ``.ckpt`` read safely)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip_l, clip_g = _sdxl_encoder_tensors(path)
    clip_l = {k: v for k, v in clip_l.items() if not k.endswith("position_ids")}
    config_l = clip_config_from_state(clip_l, f"{path.name} (CLIP ViT-L)")
    model_l = load_clip_weights(CLIPTextModel(config_l), clip_l, f"{path.name} (CLIP ViT-L)")
    converted = open_clip_to_transformers(clip_g)
    projection = converted.pop("text_projection.weight", None)
    if projection is None:
        raise TargetError(f"{path.name}: the OpenCLIP ViT-bigG lacks '{SDXL_CLIP_G_PREFIX}text_projection', which gives "
                          "SDXL's pooled vector; the checkpoint is incomplete")
    tower = {k.removeprefix("text_model."): v for k, v in converted.items()}
    config_g = clip_config_from_state(tower, f"{path.name} (OpenCLIP ViT-bigG)", hidden_act="gelu",
                                      projection_dim=int(projection.shape[0]))
    model_g = load_clip_weights(CLIPTextModelWithProjection(config_g), tower, f"{path.name} (OpenCLIP ViT-bigG)",
                                {"text_projection.weight": projection})
    for config in (config_l, config_g):
        if config.max_position_embeddings < TARGET_TOKENS:
            raise TargetError(f"{path.name} has {config.max_position_embeddings} positions; SDXL conditioning needs {TARGET_TOKENS}")
    tokenizer = _load_tokenizer(tokenizer_folder, pack_root, holder="an SDXL checkpoint")
    vocab = min(config_l.vocab_size, config_g.vocab_size)
    if len(tokenizer) > vocab:
        raise TargetError(
            f"tokenizer has {len(tokenizer)} tokens but {path.name}'s text encoders have {vocab} embeddings: "
            "use CLIP's tokenizer (ComfyUI/comfy/sd1_tokenizer or openai/clip-vit-large-patch14)"
        )
    target = SDXLTextTarget(model_l, model_g, tokenizer, f"{path.name} (SDXL CLIP-L + bigG)")
    target.to(dtype).eval().requires_grad_(False)
    logger.info("Target: SDXL text encoders of %s (CLIP-L %d layers, bigG %d layers, width %d + %d, pooled %d)", path.name,
                config_l.num_hidden_layers, config_g.num_hidden_layers, config_l.hidden_size, config_g.hidden_size,
                target.pooled_dim)
    return target
