"""Hugging Face text encoders loaded offline from a local folder.

Any folder written by ``save_pretrained`` (XLM-Roberta, T5/mT5 encoders, BERT/RoBERTa, CLIP text,
decoder-only LMs) loads with transformers, never with remote code and never from the network.
Tokenisation follows GlueGen's recipe: ``truncation=True, max_length=77, padding="max_length"``,
attention mask passed, ``last_hidden_state`` returned for every position (padding included).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from torch import nn

from ..errors import X2IError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "vocab.txt", "vocab.json",
)
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
# Encoder-decoder families whose encoder has its own class, so the decoder is never loaded.
ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
}
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
# A prompt longer than this is refused before it is tokenised: every recipe reads 77 or 120 tokens, and
# tokenising a multi-megabyte prompt pasted into a graph would hold the server for seconds.
MAX_PROMPT_CHARS = 50_000
# Every transformers Auto* call: the local folder only, and never code shipped in it (said explicitly, so
# transformers refuses instead of asking on a terminal a server does not have).
OFFLINE_NO_REMOTE_CODE = {"local_files_only": True, "trust_remote_code": False}


class TextEncoderFolderError(X2IError):
    """A text-encoder folder that cannot be loaded; the message says what is missing and how to fix it."""


def check_prompts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list of strings, each at most :data:`MAX_PROMPT_CHARS` long, or ``ValueError`` naming the limit."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise X2IError(f"a prompt must be text, got {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise X2IError(
                f"the prompt has {len(text):,} characters, over the limit of {MAX_PROMPT_CHARS:,}; only its first 77 "
                "tokens are used, so shorten it"
            )
    return texts


def is_encoder_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def list_encoder_folders(roots: Sequence[str | os.PathLike[str]], max_depth: int = 2) -> list[str]:
    """Relative names of Hugging Face model folders (holding ``config.json``) under ``roots``."""
    found: set[str] = set()
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        frontier = [root]
        for _ in range(max_depth):
            next_frontier = []
            for folder in frontier:
                for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    if is_encoder_folder(child):
                        found.add(child.relative_to(root).as_posix())
                    else:
                        next_frontier.append(child)
            frontier = next_frontier
    return sorted(found)


def check_encoder_folder(folder: Path) -> None:
    """Raise :class:`TextEncoderFolderError` naming what a usable folder lacks."""
    if not folder.is_dir():
        raise TextEncoderFolderError(f"text encoder folder not found: {folder}")
    if not (folder / CONFIG_FILE).is_file():
        raise TextEncoderFolderError(
            f"{folder.name} has no config.json: put a whole Hugging Face model folder (config, tokenizer and "
            "weights, as written by save_pretrained or downloaded from the model's page) in models/x2i_text_encoders"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TextEncoderFolderError(
            f"{folder.name} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}): copy the tokenizer files "
            "from the model's Hugging Face repository into this folder"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise TextEncoderFolderError(
            f"{folder.name} has no weights (looked for {', '.join(WEIGHT_FILES)}): download model.safetensors "
            "into this folder"
        )


class HFTextEncoder(nn.Module):
    """A transformers encoder plus its tokenizer, as one module that ComfyUI's ModelPatcher can move.

    ``device`` is a plain attribute because ComfyUI's ModelPatcher assigns it, which raw
    transformers models reject.
    """

    def __init__(self, transformer: nn.Module, tokenizer, name: str, max_length: int = 77, use_attention_mask: bool = True) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask
        self.device = torch.device("cpu")

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = check_prompts(texts)
        for text in texts:
            n = self.count_tokens(text)
            if n > self.max_length:
                logger.warning(
                    "%s: prompt has %d tokens; like the official GlueGen recipe only the first %d are used: %.60r...",
                    self.name, n, self.max_length, text,
                )
        batch = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if self.use_attention_mask else None
        return self.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), max_length, hidden_size]`` float32 features on the encoder's device."""
        tokens = self.tokenize(texts)
        device = next(self.transformer.parameters()).device
        return self(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float()


def load_text_encoder(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32, max_length: int = 77) -> HFTextEncoder:
    """Load a local Hugging Face folder as an :class:`HFTextEncoder` on the CPU (offline, no remote code)."""
    folder = Path(folder)
    check_encoder_folder(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **OFFLINE_NO_REMOTE_CODE)
    except (ValueError, KeyError) as exc:
        raise TextEncoderFolderError(
            f"{folder.name}: config.json is not a model transformers knows, and code shipped in a model folder is never "
            f"run ({str(exc)[:300]})"
        ) from exc
    class_name = ENCODER_CLASSES.get(config.model_type)
    kwargs = {**OFFLINE_NO_REMOTE_CODE, _DTYPE_KWARG: dtype}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **OFFLINE_NO_REMOTE_CODE)
        if class_name is not None:
            model = getattr(transformers, class_name).from_pretrained(folder, **kwargs)
        elif getattr(config, "is_encoder_decoder", False):
            model = transformers.AutoModel.from_pretrained(folder, **kwargs).get_encoder()
        else:
            model = transformers.AutoModel.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise TextEncoderFolderError(f"{folder.name} could not be loaded offline without running its own code: {str(exc)[:300]}") from exc
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often lack a pad token; padding to 77 needs one.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    logger.info("Loaded text encoder %s (%s, hidden %d, %s)", folder.name, config.model_type, model.config.hidden_size, dtype)
    return HFTextEncoder(model, tokenizer, folder.name, max_length=max_length)
