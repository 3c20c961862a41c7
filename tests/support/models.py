"""Builders of tiny real-architecture models and official-format files for the tests.

Everything is made offline: sentencepiece/tokenizers vocabularies are trained on the fly, model
folders are written with ``save_pretrained``, checkpoints with the official key names and shapes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

from support import DATA_DIR, REPO_ROOT  # noqa: F401  (DATA_DIR: re-exported for the golden tests)

CORPUS = [
    "a painting of a garden in the afternoon, impressionism",
    "a photo of an astronaut riding a horse on mars",
    "Peinture impressionniste d'un jardin d'après-midi",
    "un chat assis sur un tapis rouge, photographie",
    "Pintura impresionista de un jardín de tarde",
    "un perro corriendo en la playa al atardecer",
    "Pittura impressionista di un giardino pomeridiano",
    "un gatto che dorme sul divano",
    "下午的花园的印象派绘画",
    "一只猫坐在红色的地毯上",
    "午後の庭の印象派絵画",
    "赤いじゅうたんの上に座っている猫",
]

# The released multilingual GlueNet: Translator_noln(77, 1024, 768, mult=2, depth=5).
RELEASED_TEXT_ARGS = (77, 1024, 768, 2, 5)
# The released sound GlueNet: Translator_w_head(16, 77, 64, 768, mult=4, depth=5).
RELEASED_SOUND_ARGS = (16, 77, 64, 768, 4, 5)


def train_sentencepiece(vocab_size: int = 320, model_type: str = "unigram") -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _sentencepiece_vocab(specials: list[str]) -> list[tuple[str, float]]:
    """The trained unigram pieces with their scores, after ``specials`` (sentencepiece's own <unk>/<s>/</s> dropped)."""
    sp = train_sentencepiece()
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return [(token, 0.0) for token in specials] + [(p, s) for p, s in pieces if p not in ("<unk>", "<s>", "</s>")]


def write_tokenizer_folder(folder: Path, tokenizer, tokenizer_class: str, **config) -> Path:
    """``tokenizer.json`` (a ``tokenizers.Tokenizer``) and ``tokenizer_config.json`` naming the model's tokenizer
    class, as Hugging Face model folders ship them. Written with the ``tokenizers`` library, not a transformers
    constructor: transformers 4 and 5 take different constructor arguments (4's slow classes want a
    sentencepiece file and protobuf to convert it), but both load this folder with ``AutoTokenizer``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": tokenizer_class, "model_max_length": 1000000000000000019884624838656, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return folder


def _unigram_tokenizer(vocab: list[tuple[str, float]], unk: str, single: str, pair: str, specials: list[str]):
    """A sentencepiece-style unigram ``tokenizers.Tokenizer`` (Metaspace ▁, as transformers converts XLM-R's and T5's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = [token for token, _ in vocab]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=tokens.index(unk), byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    used = sorted({word for word in (single + " " + pair).split() if not word.startswith("$")})
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, tokens.index(token)) for token in used]
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return tokenizer


def make_xlm_roberta_folder(folder: Path, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A tiny XLM-Roberta folder (tokenizer + random weights) laid out like xlm-roberta-large's."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    # fairseq layout used by XLM-R: <s>, <pad>, </s>, <unk>, then the sentencepiece pieces, <mask> last.
    vocab = [*_sentencepiece_vocab(["<s>", "<pad>", "</s>", "<unk>"]), ("<mask>", 0.0)]
    tokenizer = _unigram_tokenizer(
        vocab, "<unk>", "<s> $A </s>", "<s> $A </s> </s> $B </s>", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    config = XLMRobertaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128 + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    torch.manual_seed(seed)
    model = XLMRobertaModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer_folder(
        folder, tokenizer, "XLMRobertaTokenizer", bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )
    return folder


def make_t5_encoder_folder(folder: Path, d_model: int = 48, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A tiny T5 (v1.1-style, gated-gelu) folder saved as a full encoder-decoder, like google/t5-v1_1-*."""
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = _sentencepiece_vocab(["<pad>", "</s>", "<unk>"])
    tokenizer = _unigram_tokenizer(vocab, "<unk>", "$A </s>", "$A </s> $B </s>", ["<pad>", "</s>", "<unk>"])
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_model * 2,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer_folder(folder, tokenizer, "T5Tokenizer", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    return folder


def official_layout(name: str) -> dict[str, list[int]]:
    """Key -> shape of a released checkpoint, as read from the official classes (tests/data)."""
    return json.loads((DATA_DIR / "gluenet_official_layouts.json").read_text())[name]


def random_state_dict(layout: dict[str, list[int]], seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights for a key -> shape layout: LayerNorm-like 1-D weights near 1, biases near 0."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith(".bias"):
            state[key] = torch.randn(shape, generator=g) * std
        elif len(shape) == 1:
            state[key] = 1.0 + torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = shape[1]
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


def translator_noln_layout(num_tok: int, dim: int, dim_out: int, depth: int, mult: int = 2) -> dict[str, list[int]]:
    """The official ``Translator_noln`` key -> shape layout for any size (derived from the released one)."""
    layout: dict[str, list[int]] = {}
    t, d = num_tok, dim
    for i in range(depth):
        for net, n in (("net_tok", t), ("net_sen", d)):
            h = n * mult
            for idx, shape in ((0, [h, n]), (1, [h]), (3, [h, h]), (4, [h]), (6, [n, h]), (7, [n])):
                layout[f"blocks.{i}.{net}.{idx}.weight"] = shape
                layout[f"blocks.{i}.{net}.{idx}.bias"] = [shape[0]]
    for net, n, out in (("net_tok", t, t), ("net_sen", d, dim_out)):
        h = n * mult
        for idx, shape in ((0, [h, n]), (2, [h, h]), (4, [out, h])):
            layout[f"tail.{net}.{idx}.weight"] = shape
            layout[f"tail.{net}.{idx}.bias"] = [shape[0]]
    return layout


# ---- An independent reference of the official math (functional, straight from the state_dict) ----

def _reference_mlp(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    linear_idx = (0, 3, 6) if layer_norm else (0, 2, 4)
    for n, idx in enumerate(linear_idx):
        x = F.linear(x, sd[f"{prefix}.{idx}.weight"], sd[f"{prefix}.{idx}.bias"])
        if layer_norm:
            w, b = sd[f"{prefix}.{idx + 1}.weight"], sd[f"{prefix}.{idx + 1}.bias"]
            x = F.layer_norm(x, w.shape, w, b, eps=1e-5)
        if n < 2:
            x = F.gelu(x)
    return x


def _reference_base(sd, prefix: str, x: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    # translator_base(_noln).forward: residuals only when the width is kept.
    same = sd[f"{prefix}.net_sen.0.weight"].shape[1] == (
        sd[f"{prefix}.net_sen.6.weight"] if layer_norm else sd[f"{prefix}.net_sen.4.weight"]
    ).shape[0]
    y = _reference_mlp(sd, f"{prefix}.net_sen", x, layer_norm)
    if same:
        y = y + x
    y = y.transpose(1, 2)
    z = _reference_mlp(sd, f"{prefix}.net_tok", y, layer_norm)
    if same:
        z = z + y
    return z.transpose(1, 2)


def reference_translator_noln(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Official ``Translator_noln.forward`` written independently of the pack's modules."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        x = F.gelu(_reference_base(sd, f"blocks.{i}", x, layer_norm=True) + x)
    return _reference_base(sd, "tail", x, layer_norm=False)


def reference_tensor_norm_half() -> torch.Tensor:
    """tensor_norm / 2 as typed in the official inference code (independent copy)."""
    values = [
        43.8203, 28.3668, 27.9345, 28.0084, 28.2958, 28.2576, 28.3373, 28.2695, 28.4097, 28.2790, 28.2825,
        28.2807, 28.2775, 28.2708, 28.2682, 28.2624, 28.2589, 28.2611, 28.2616, 28.2639, 28.2613, 28.2566,
        28.2615, 28.2665, 28.2799, 28.2885, 28.2852, 28.2863, 28.2780, 28.2818, 28.2764, 28.2532, 28.2412,
        28.2336, 28.2514, 28.2734, 28.2763, 28.2977, 28.2971, 28.2948, 28.2818, 28.2676, 28.2831, 28.2890,
        28.2979, 28.2999, 28.3117, 28.3363, 28.3554, 28.3626, 28.3589, 28.3597, 28.3543, 28.3660, 28.3731,
        28.3717, 28.3812, 28.3753, 28.3810, 28.3777, 28.3693, 28.3713, 28.3670, 28.3691, 28.3679, 28.3624,
        28.3703, 28.3703, 28.3720, 28.3594, 28.3576, 28.3562, 28.3438, 28.3376, 28.3389, 28.3433, 28.3191,
    ]
    return torch.tensor(values).unsqueeze(1) / 2


def reference_gluegen_text(folder: Path, sd: dict[str, torch.Tensor], texts: list[str]) -> torch.Tensor:
    """The official multilingual path, ``GlueNet(XLMR(text) / 3) * tensor_norm / 2``, from scratch."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).float().eval()
    tokens = tokenizer(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        features = model(**tokens)["last_hidden_state"] / 3
        return reference_translator_noln(sd, features) * reference_tensor_norm_half()


def make_clap_folder(folder: Path, projection_dim: int = 32, seed: int = 0) -> Path:
    """A tiny CLAP (HTSAT audio tower + RoBERTa text tower) folder with its feature extractor,
    laid out like laion/clap-htsat-unfused (truncation 'rand_trunc', 48 kHz, 10 s)."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    audio = dict(
        hidden_size=128, patch_embeds_hidden_size=16, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
        projection_dim=projection_dim, window_size=8, spec_size=256, num_mel_bins=64,
    )
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                projection_dim=projection_dim, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(audio_config=audio, text_config=text, projection_dim=projection_dim)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    ClapFeatureExtractor(truncation="rand_trunc").save_pretrained(folder)
    return folder


# ---- ULIP PointBERT checkpoints in the released layout ----

def official_pointbert_layout(variant: str) -> dict[str, list[int]]:
    """Official ULIP keys (``point_encoder.*`` + ``pc_projection``) → shape."""
    return json.loads((DATA_DIR / "pointbert_official_layouts.json").read_text())[variant]


def stripped_pointbert_layout(variant: str) -> dict[str, list[int]]:
    return {k.removeprefix("point_encoder."): v for k, v in official_pointbert_layout(variant).items()}


def fake_ulip_checkpoint(variant: str, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """A released-style ULIP file: DDP prefixes, image/text towers, logit_scale, optimizer state, argparse args."""
    gen = torch.Generator().manual_seed(seed)
    point_state = {
        k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=gen) * 0.05 + (1.0 if k.endswith("running_var") else 0.0))
        for k, shape in stripped_pointbert_layout(variant).items()
    }
    state_dict = {("module.pc_projection" if k == "pc_projection" else f"module.point_encoder.{k}"): v for k, v in point_state.items()}
    state_dict.update({
        "module.logit_scale": torch.tensor(4.6),
        "module.visual.patch_embed.proj.weight": torch.zeros(8, 3, 2, 2),
        "module.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4),
        "module.token_embedding.weight": torch.zeros(10, 4),
        "module.image_projection": torch.zeros(4, 4),
        "module.text_projection": torch.zeros(4, 4),
    })
    checkpoint = {
        "epoch": "last",
        "state_dict": state_dict,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "scaler": {"scale": 65536.0},
        "best_acc1": 60.3,
        "args": argparse.Namespace(model="ULIP_PointBERT", npoints=8192, output_dir="./outputs"),
    }
    return checkpoint, point_state


# ---- AudioCLIP audio branch in the released layout ----

def seeded_audio_weights(layout: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic full-size weights for the audio branch, one generator, keys in sorted order.

    Convolutions He-scaled, BatchNorm affine near identity, the fbsp layer away from its DFT
    initialisation (fractional ``m`` makes the side-lobe powers complex). The window and the running
    statistics are placeholders: :func:`golden_weights` puts in the official ones.
    """
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key in sorted(layout):
        shape = layout[key]
        module, _, leaf = key.rpartition(".")
        is_batch_norm = f"{module}.running_mean" in layout
        if key == "window" or leaf == "running_var":
            value = torch.ones(shape)
        elif leaf == "running_mean":
            value = torch.zeros(shape)
        elif leaf == "num_batches_tracked":
            value = torch.zeros(shape, dtype=torch.int64)
        elif key == "fbsp.m":
            value = torch.rand(shape, generator=g) * 2.3 + 0.2
        elif key == "fbsp.fb":
            value = torch.rand(shape, generator=g) * 1.5 + 0.5
        elif key == "fbsp.fc":
            value = torch.arange(shape[0], dtype=torch.float32) + torch.rand(shape, generator=g) - 0.5
        elif key == "fbsp.bias":
            value = torch.empty(shape)
        elif is_batch_norm and leaf == "weight":
            value = torch.rand(shape, generator=g) + 0.5
        elif leaf == "bias":
            value = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 4:
            value = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        else:
            value = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        state[key] = value
    return state


def audioclip_full_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a released-style ``AudioCLIP-Full-Training.pt``: every audio key under ``audio.`` (full
    size, seeded), plus image/text-tower decoys; returns the audio weights without the prefix."""
    layout = json.loads((DATA_DIR / "audioclip_official_layout.json").read_text())["audio_keys"]
    weights = seeded_audio_weights(layout, seed)
    state = {f"audio.{k}": v for k, v in weights.items()}
    state.update({"logit_scale": torch.tensor(4.6), "visual.conv1.weight": torch.zeros(8, 3, 2, 2),
                  "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4)})
    torch.save(state, path)
    return weights


# ---- LaVi-Bridge folders in the released layout ----

def write_lavibridge_folder(
    folder: Path, language_model, family: str, adapter_in: int, seed: int = 0, rank: int = 32, pixart: bool = False
) -> Path:
    """``<folder>/lora_vis.pt`` (full-size SD1.x U-Net, or PixArt-XL-2 with ``pixart``), ``lora_text.pt``
    (for ``language_model``) as positional fp16 ``[up, down, ...]`` lists, and ``adapter/`` as the
    official save_pretrained writes it (out width 768, or 4096 for PixArt)."""
    import x2i.bridge as bridge

    g = torch.Generator().manual_seed(seed)

    def pairs(targets) -> list[torch.Tensor]:
        flat: list[torch.Tensor] = []
        for target in targets:
            up_shape, down_shape = target.pair_shapes(rank)
            flat += [(torch.randn(up_shape, generator=g) * 0.02).half(), (torch.randn(down_shape, generator=g) * 0.02).half()]
        return flat

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(pairs(bridge.pixart_lora_targets() if pixart else bridge.unet_lora_targets()), folder / "lora_vis.pt")
    torch.save(pairs(bridge.text_lora_targets(language_model, family)), folder / "lora_text.pt")
    out_dim = 4096 if pixart else 768
    adapter = bridge.TextAdapter(bridge.TextAdapterConfig(adapter_in, 64, out_dim))
    (folder / "adapter").mkdir(exist_ok=True)
    config = {"_class_name": "TextAdapter", "_diffusers_version": "0.24.0", "in_dim": adapter_in, "int_dim": 64, "out_dim": out_dim}
    (folder / "adapter" / "config.json").write_text(json.dumps(config))
    torch.save(adapter.state_dict(), folder / "adapter" / "diffusion_pytorch_model.bin")
    return folder


def make_llama_folder(folder: Path, hidden: int = 32, seed: int = 0, add_bos_token: bool = True) -> Path:
    """A tiny Llama (CausalLM checkpoint + BPE tokenizer with Llama-2's <unk>/<s>/</s> = 0/1/2,
    add_bos_token True, add_eos_token False, no pad token): weights with save_pretrained, tokenizer.json with
    the tokenizers library."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator(CORPUS * 5, trainer)
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    # Llama-2's tokenizer.json: byte-fallback BPE, "▁" prepended to the first word only, <s> before the text. No
    # unk token in the model (as transformers 5 writes it), so a character outside this tiny vocabulary (which has
    # no <0x..> byte pieces) is dropped in every transformers version alike.
    tokenizer = Tokenizer(models.BPE(vocab=model_json["vocab"], merges=merges, unk_token=None, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = model_json["vocab"]["<s>"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0" if add_bos_token else "$A:0",
        pair="<s>:0 $A:0 <s>:1 $B:1" if add_bos_token else "$A:0 $B:1",
        special_tokens=[("<s>", bos)] if add_bos_token else [],
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in ("<unk>", "<s>", "</s>")])
    config = LlamaConfig(
        vocab_size=len(model_json["vocab"]), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer_folder(
        folder, tokenizer, "LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=add_bos_token, add_eos_token=False, clean_up_tokenization_spaces=False, legacy=False,
    )
    return folder


def pixart_xl2_512_layout(depth: int = 28) -> dict[str, list[int]]:
    """Key names and shapes of the released PixArt-XL-2-512x512 transformer (PixArt-α, no
    micro-conditions, 120 caption tokens of T5-XXL width 4096, 32x32 patches at 512 px), with
    ``depth`` blocks instead of 28."""
    hidden, mlp, tokens, text = 1152, 4608, 120, 4096
    layout = {
        "pos_embed": [1, 1024, hidden],
        "x_embedder.proj.weight": [hidden, 4, 2, 2], "x_embedder.proj.bias": [hidden],
        "t_embedder.mlp.0.weight": [hidden, 256], "t_embedder.mlp.0.bias": [hidden],
        "t_embedder.mlp.2.weight": [hidden, hidden], "t_embedder.mlp.2.bias": [hidden],
        "t_block.1.weight": [6 * hidden, hidden], "t_block.1.bias": [6 * hidden],
        "y_embedder.y_embedding": [tokens, text],
        "y_embedder.y_proj.fc1.weight": [hidden, text], "y_embedder.y_proj.fc1.bias": [hidden],
        "y_embedder.y_proj.fc2.weight": [hidden, hidden], "y_embedder.y_proj.fc2.bias": [hidden],
        "final_layer.scale_shift_table": [2, hidden],
        "final_layer.linear.weight": [2 * 2 * 8, hidden], "final_layer.linear.bias": [2 * 2 * 8],  # learn_sigma: 8 channels
    }
    for i in range(depth):
        block = f"blocks.{i}."
        layout |= {
            block + "scale_shift_table": [6, hidden],
            block + "attn.qkv.weight": [3 * hidden, hidden], block + "attn.qkv.bias": [3 * hidden],
            block + "attn.proj.weight": [hidden, hidden], block + "attn.proj.bias": [hidden],
            block + "cross_attn.q_linear.weight": [hidden, hidden], block + "cross_attn.q_linear.bias": [hidden],
            block + "cross_attn.kv_linear.weight": [2 * hidden, hidden], block + "cross_attn.kv_linear.bias": [2 * hidden],
            block + "cross_attn.proj.weight": [hidden, hidden], block + "cross_attn.proj.bias": [hidden],
            block + "mlp.fc1.weight": [mlp, hidden], block + "mlp.fc1.bias": [mlp],
            block + "mlp.fc2.weight": [hidden, mlp], block + "mlp.fc2.bias": [hidden],
        }
    return layout


def write_pixart_checkpoint(path: Path, depth: int = 2, seed: int = 0) -> Path:
    """A random-weight fp16 safetensors file in the released PixArt-XL-2-512x512 layout (bare keys,
    as the converted single files that ComfyUI's "Load Diffusion Model" reads), ``depth`` blocks."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in pixart_xl2_512_layout(depth).items():
        value = torch.zeros(shape) if key.endswith(".bias") else torch.randn(shape, generator=g) * 0.02
        tensors[key] = value.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_pixart_lora_vis(folder: Path, depth: int, seed: int = 0, rank: int = 32) -> Path:
    """Replace ``<folder>/lora_vis.pt`` by a released-format PixArt LoRA list for ``depth`` blocks
    (for a reduced-depth PixArt test model; :func:`write_lavibridge_folder` writes 28)."""
    import x2i.bridge as bridge

    g = torch.Generator().manual_seed(seed)
    flat: list[torch.Tensor] = []
    for target in bridge.pixart_lora_targets(depth):
        up_shape, down_shape = target.pair_shapes(rank)
        flat += [(torch.randn(up_shape, generator=g) * 0.02).half(), (torch.randn(down_shape, generator=g) * 0.02).half()]
    torch.save(flat, folder / "lora_vis.pt")
    return folder / "lora_vis.pt"


def write_part_of_checkpoint(checkpoint: Path, target: Path, prefix: str) -> Path:
    """The ``prefix*`` tensors of an SD single-file checkpoint, prefix removed, as a standalone file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), framework="pt") as handle:
        tensors = {k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"{checkpoint} has no {prefix}* keys")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


def write_vae_from_checkpoint(checkpoint: Path, target: Path) -> Path:
    """SD's VAE as a standalone file (the layout of ``vae-ft-ema-560000-ema-pruned.safetensors``)."""
    return write_part_of_checkpoint(checkpoint, target, "first_stage_model.")


def write_clip_from_checkpoint(checkpoint: Path, target: Path) -> Path:
    """SD1.x's CLIP ViT-L/14 text tower as a standalone file (``clip_l.safetensors``'s ``text_model.*``
    layout, which Load CLIP reads with type stable_diffusion)."""
    return write_part_of_checkpoint(checkpoint, target, "cond_stage_model.transformer.")


# ---- Weights that depend on nothing but (key, shape, seed): the golden files were made with these ----

def splitmix_uniform(n: int, seed: int) -> np.ndarray:
    """``n`` floats in [-1, 1) from SplitMix64 in uint64 arithmetic: identical on every platform and version."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0
