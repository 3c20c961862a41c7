"""Language-model features exactly as the official LaVi-Bridge inference scripts compute them.

Three released recipes (``test/t5_unet.py``, ``test/llama2_unet.py``, ``test/t5_transformer.py``):

- ``t5_unet``: T5-Large encoder, 77 tokens (EOS, right padding with ``<pad>``), called **without** an
  attention mask; ``last_hidden_state`` for every position, padding included.
- ``llama2_unet``: Llama-2-7B, 77 tokens: BOS, no EOS, right padding with the id of ``'[PAD]'``
  (not in Llama-2's vocabulary, so it resolves to ``<unk>`` = 0), no attention mask; the hidden
  state after the final RMSNorm (``hidden_states[-1]`` of the CausalLM == ``last_hidden_state`` of
  the base model); run in float16, cast to float32 before the adapter.
- ``t5_transformer``: T5-Large encoder, 120 tokens, attention mask given to T5 **and** returned
  for PixArt's cross-attention; :func:`encode_prompt_for_bridge` keeps only the tokens that mask
  lets cross-attention see, which is the same attention without a mask.

Models are loaded with :func:`..encoders.text.load_text_encoder`; the functions here take an already
loaded transformers model and tokenizer and never mutate the tokenizer.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..encoders.text import CONFIG_FILE, HFTextEncoder, check_prompts, load_text_encoder
from ..weights import read_json_object
from .adapter import RELEASED_ADAPTERS, TextAdapterConfig
from .errors import LaViBridgeFileError
from .lora import TextFamily

logger = logging.getLogger(__name__)

# Appended to every prompt by the official inference scripts (not to the empty unconditional one).
OFFICIAL_PROMPT_SUFFIX = ", best quality, extremely detailed, 4k resolution"
# The official Llama script sets ``tokenizer.pad_token = '[PAD]'``; its id is whatever the tokenizer
# maps that string to (``<unk>`` for Llama-2), so the same lookup reproduces it for any tokenizer.
OFFICIAL_LLAMA_PAD_TOKEN = "[PAD]"


class LaViBridgeRecipe(str, enum.Enum):
    """The released (language model, diffusion model) pairs; values are the release's folder names."""

    T5_UNET = "t5_unet"
    LLAMA2_UNET = "llama2_unet"
    T5_TRANSFORMER = "t5_transformer"


@dataclass(frozen=True)
class LaViBridgeTextConfig:
    """How one recipe turns prompts into language-model features."""

    recipe: LaViBridgeRecipe
    max_length: int
    decoder_only: bool
    # T5 -> PixArt passes the mask to T5 and returns it; the U-Net recipes use neither.
    use_attention_mask: bool
    # Precision of the official inference script (Llama-2 was halved to fit a 24 GB GPU).
    default_dtype: torch.dtype
    adapter: TextAdapterConfig
    language_model: str
    diffusion_model: str


TEXT_CONFIGS: dict[LaViBridgeRecipe, LaViBridgeTextConfig] = {
    LaViBridgeRecipe.T5_UNET: LaViBridgeTextConfig(
        LaViBridgeRecipe.T5_UNET, 77, False, False, torch.float32, RELEASED_ADAPTERS["t5_unet"], "t5-large", "SD1.x U-Net"
    ),
    LaViBridgeRecipe.LLAMA2_UNET: LaViBridgeTextConfig(
        LaViBridgeRecipe.LLAMA2_UNET, 77, True, False, torch.float16, RELEASED_ADAPTERS["llama2_unet"], "Llama-2-7B", "SD1.x U-Net"
    ),
    LaViBridgeRecipe.T5_TRANSFORMER: LaViBridgeTextConfig(
        LaViBridgeRecipe.T5_TRANSFORMER, 120, False, True, torch.float32, RELEASED_ADAPTERS["t5_transformer"], "t5-large", "PixArt-XL-2"
    ),
}


def text_config(recipe: LaViBridgeRecipe | str) -> LaViBridgeTextConfig:
    try:
        return TEXT_CONFIGS[LaViBridgeRecipe(recipe)]
    except ValueError as exc:
        names = ", ".join(r.value for r in LaViBridgeRecipe)
        raise ValueError(f"unknown LaVi-Bridge recipe {recipe!r}: use one of {names}") from exc


# ---------------------------------------------------------------------------------------------------
# Language-model families: "t5" (an encoder, the T5 recipes) or "llama" (a decoder-only model, the Llama
# recipe); the family decides the LoRA layers (:func:`.lora.text_lora_targets`) and how prompts are encoded.

T5_MODEL_TYPES = ("t5", "mt5", "umt5")


def family_of_recipe(recipe: LaViBridgeRecipe | str) -> TextFamily:
    """The family of the language model a recipe was trained with."""
    return "llama" if text_config(recipe).decoder_only else "t5"


def family_of_hf_config(config: Mapping[str, object], name: str) -> TextFamily:
    """The family of a Hugging Face model from its ``config.json`` fields (``model_type``,
    ``is_encoder_decoder``): T5 / mT5 / UMT5 bridge by their encoder, any other decoder-only model as
    Llama does; other encoder-decoders (BART, ...) have no LaVi-Bridge recipe. ``name`` is for messages."""
    model_type = str(config.get("model_type", ""))
    if model_type in T5_MODEL_TYPES:
        return "t5"
    if config.get("is_encoder_decoder"):
        raise LaViBridgeFileError(f"{name} is a {model_type} encoder-decoder; LaVi-Bridge bridges T5 encoders or Llama-style decoders")
    return "llama"


def family_of_hf_folder(folder: str | os.PathLike[str]) -> TextFamily:
    """:func:`family_of_hf_config` of a Hugging Face model folder, read from its ``config.json`` alone."""
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise LaViBridgeFileError(f"language model {folder} has no config.json: give a Hugging Face model folder")
    return family_of_hf_config(read_json_object(config_file, LaViBridgeFileError, str(config_file)), folder.name)


def _llama_pad_id(tokenizer) -> int:
    pad_id = tokenizer.convert_tokens_to_ids(OFFICIAL_LLAMA_PAD_TOKEN)
    if pad_id is None:
        pad_id = tokenizer.unk_token_id
    if pad_id is None:
        # Tokenizers without <unk> (Llama-3) could not run the official script; EOS is the usual stand-in.
        pad_id = tokenizer.eos_token_id
        logger.warning("LaVi-Bridge: tokenizer has neither '[PAD]' nor <unk>; padding with EOS (id %s)", pad_id)
    if pad_id is None:
        raise LaViBridgeFileError(
            "the language model's tokenizer has no '[PAD]', <unk> or EOS token to pad prompts with: "
            "use the tokenizer that came with the model"
        )
    return int(pad_id)


def tokenize_for_bridge(
    recipe: LaViBridgeRecipe | str, tokenizer, texts: Sequence[str], add_prompt_suffix: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[B, max_length]`` int64, right-padded as the official."""
    config = text_config(recipe)
    texts = [t + OFFICIAL_PROMPT_SUFFIX if add_prompt_suffix else t for t in check_prompts(texts)]
    n = config.max_length
    if config.decoder_only:
        # Llama-2's tokenizer adds BOS and no EOS and keeps BOS when truncating; built by hand so a
        # tokenizer saved with other add_bos/add_eos settings still gives the training-time layout.
        if tokenizer.bos_token_id is None:
            raise LaViBridgeFileError("the language model's tokenizer has no BOS token, which the Llama recipe starts every prompt with")
        pieces = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        rows = [[tokenizer.bos_token_id, *ids] for ids in pieces]
        lengths = [len(r) for r in rows]
        pad_id = _llama_pad_id(tokenizer)
    else:
        rows = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        lengths = [len(r) for r in rows]
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            raise LaViBridgeFileError("the T5 tokenizer has no pad token: use the tokenizer that came with the model")
        if any(len(r) > n for r in rows):
            # Truncate as the tokenizer does (text cut, closing EOS kept), not by slicing the ids.
            rows = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=n)["input_ids"]
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (text, row, length) in enumerate(zip(texts, rows, lengths, strict=True)):
        if length > n:
            logger.warning(
                "LaVi-Bridge %s: prompt has %d tokens; like the official scripts only the first %d are used: %.60r...",
                config.recipe.value, length, n, text,
            )
            row = row[:n]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _module_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def encode_for_bridge(
    recipe: LaViBridgeRecipe | str,
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    add_prompt_suffix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Official language-model features: ``(float32 [B, T, H], mask [B, T] or None)``.

    ``model`` is a transformers model (T5EncoderModel / T5ForConditionalGeneration, LlamaModel /
    LlamaForCausalLM) or an :class:`HFTextEncoder`; it runs in its own dtype and device. The mask is
    returned only for the PixArt recipe, on the model's device.
    """
    config = text_config(recipe)
    if isinstance(model, HFTextEncoder):
        model = model.transformer
    ids, mask = tokenize_for_bridge(config.recipe, tokenizer, texts, add_prompt_suffix)
    device = _module_device(model)
    ids, mask = ids.to(device), mask.to(device)
    if config.decoder_only:
        if getattr(model.config, "is_encoder_decoder", False):
            raise LaViBridgeFileError(f"recipe {config.recipe.value} needs a decoder-only language model (Llama-2), got {model.config.model_type}")
        # The base model skips the LM head; its last_hidden_state is hidden_states[-1] of the CausalLM
        # (after the final RMSNorm). No attention mask: padding sits after the text, causal attention
        # keeps it out of the text positions, and the pad positions' features are used as computed.
        features = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return features.float(), None
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    features = model(input_ids=ids, attention_mask=mask if config.use_attention_mask else None).last_hidden_state
    return features.float(), (mask if config.use_attention_mask else None)


def attended_tokens(features: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each prompt's features ``[1, T_i, H]`` restricted to the positions its attention mask keeps.

    Cross-attention with a key padding mask gives every masked key zero weight, so attending over
    the kept tokens only is the same attention (PixArt's official call masks the padded keys of
    its 120 tokens). ComfyUI's conditioning carries no mask, so this is how the PixArt recipe's
    features reach its cross-attention. Without a mask (the U-Net recipes) every position is kept.
    """
    if mask is None:
        return [row.unsqueeze(0) for row in features]
    if mask.shape != features.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match features {tuple(features.shape)}")
    keep = mask.to(device=features.device).bool()
    return [row[kept].unsqueeze(0) for row, kept in zip(features, keep, strict=True)]


def encode_prompt_for_bridge(
    recipe: LaViBridgeRecipe | str, model: nn.Module, tokenizer, text: str, add_prompt_suffix: bool = False
) -> torch.Tensor:
    """One prompt's features as the bridged diffusion model attends to them: float32 ``[1, T, H]``.

    The official features of :func:`encode_for_bridge`; for the PixArt recipe only the prompt's
    real tokens (see :func:`attended_tokens`), for the U-Net recipes all 77 positions.
    """
    features, mask = encode_for_bridge(recipe, model, tokenizer, [text], add_prompt_suffix=add_prompt_suffix)
    return attended_tokens(features, mask)[0]


def load_language_model(
    folder: str | os.PathLike[str], recipe: LaViBridgeRecipe | str, dtype: torch.dtype | None = None
) -> HFTextEncoder:
    """Load the recipe's language model with :func:`load_text_encoder` (offline, CPU).

    ``dtype`` defaults to the official inference precision (float16 for Llama-2, float32 for T5).
    """
    config = text_config(recipe)
    encoder = load_text_encoder(folder, dtype=dtype or config.default_dtype, max_length=config.max_length)
    encoder.use_attention_mask = config.use_attention_mask
    if family_of_hf_config(encoder.transformer.config.to_dict(), encoder.name) != family_of_recipe(config.recipe):
        raise LaViBridgeFileError(
            f"{encoder.name} is a {encoder.transformer.config.model_type} model but recipe {config.recipe.value} needs "
            f"{config.language_model}: pick the language model the adapter was trained with"
        )
    return encoder
