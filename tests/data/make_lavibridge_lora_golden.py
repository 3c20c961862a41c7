"""Regenerate ``lavibridge_lora_golden.safetensors`` with the official LaVi-Bridge LoRA injection.

The recipe is the one ``lavibridge_golden.md`` documents: the official ``monkeypatch_or_replace_lora_extended``
(``modules/lora.py``, the function the release's ``test/*.py`` use) on tiny seeded transformers models.
Run outside CI, against a checkout of ShihaoZhaoZSH/LaVi-Bridge at the commit below (imported, never copied):

    python tests/data/make_lavibridge_lora_golden.py --official /path/to/LaVi-Bridge [--out DIR] [--check]

Needs torch, safetensors and transformers (the golden was made with torch 2.11.0 and transformers 5.23.0,
whose versions end up in the metadata; another transformers may initialise the tiny models differently).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_tools  # noqa: E402

REPO, COMMIT = "ShihaoZhaoZSH/LaVi-Bridge", "5a725f379f153991b36f307e099de01500f364c2"
RANK = 4
# family: (model class name, config kwargs, official target classes as in the release's train/test scripts, seed)
CASES = {
    "t5": ("T5EncoderModel", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=8),
           {"T5Attention"}, 11),
    "llama": ("LlamaForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                       attention_dropout=0.0),
              {"LlamaAttention"}, 12),
}


def build(family: str) -> nn.Module:
    import transformers

    name, kwargs, _, seed = CASES[family]
    config_cls = transformers.T5Config if family == "t5" else transformers.LlamaConfig
    torch.manual_seed(seed)
    return getattr(transformers, name)(config_cls(**kwargs)).float().eval()


def fingerprint(model: nn.Module) -> float:
    return float(sum(p.double().abs().sum() for p in model.state_dict().values() if p.is_floating_point()))


def run(model: nn.Module, family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if family == "t5":
            return model(input_ids=ids).last_hidden_state
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def golden_case(official, family: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    name, kwargs, classes, seed = CASES[family]
    model = build(family)
    names_of = {id(m): n for n, m in model.named_modules()}
    found = list(official._find_modules(model, classes, search_class=[nn.Linear, nn.Conv2d]))
    positional = [names_of[id(child)] for _, _, child in found]
    if not positional:
        raise SystemExit(f"the official rule matched nothing for {family}")
    attn_classes = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
    g = torch.Generator().manual_seed(100 + seed)
    loras = []
    for _, _, child in found:
        loras.append((torch.randn(child.out_features, RANK, generator=g) * 0.2).half())
        loras.append((torch.randn(RANK, child.in_features, generator=g) / RANK).half())
    ids = torch.randint(0, kwargs["vocab_size"], (2, 9), generator=g)
    base = run(model, family, ids)
    fp = fingerprint(model)
    official.monkeypatch_or_replace_lora_extended(model, list(loras), r=RANK, target_replace_module=classes)
    model.eval()  # the official LoraInjectedLinear has dropout 0.1: inference = eval
    for i, layer in enumerate(positional):  # the pair each injected layer got, by position
        assert torch.equal(model.get_submodule(layer).lora_up.weight.half(), loras[2 * i])
    out = run(model, family, ids)
    golden_tools.say(f"{family}: {attn_classes}, {len(positional)} layers patched, "
                     f"base->lora max diff {(out - base).abs().max().item():.3g}")
    tensors[f"{family}.input_ids"] = ids
    tensors[f"{family}.official_output"] = out.contiguous()
    tensors[f"{family}.base_output"] = base.contiguous()
    for i in range(len(positional)):
        tensors[f"{family}.lora.{i}.up"], tensors[f"{family}.lora.{i}.down"] = loras[2 * i], loras[2 * i + 1]
    meta[f"{family}.config"] = json.dumps(kwargs)
    meta[f"{family}.model_class"] = name
    meta[f"{family}.seed"] = str(seed)
    meta[f"{family}.official_target_classes"] = json.dumps(sorted(classes))
    meta[f"{family}.attention_classes"] = json.dumps(attn_classes)
    meta[f"{family}.positional_names"] = json.dumps(positional)
    meta[f"{family}.base_fingerprint"] = repr(fp)


def main(argv: list[str] | None = None) -> None:
    args = golden_tools.parse_args(__doc__.splitlines()[0], REPO, COMMIT, argv)
    golden_tools.use_official(args.official)
    import transformers
    from modules import lora as official  # the official module

    tensors: dict[str, torch.Tensor] = {}
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "rank": str(RANK)}
    for family in CASES:
        golden_case(official, family, tensors, meta)
    meta["provenance"] = ("ShihaoZhaoZSH/LaVi-Bridge modules/lora.py monkeypatch_or_replace_lora_extended on tiny seeded "
                          "transformers models, eval mode, fp32; see tests/data/lavibridge_golden.md")
    golden = args.stage / "lavibridge_lora_golden.safetensors"
    save_file(tensors, str(golden), metadata=meta)
    golden_tools.finish(args, [golden])


if __name__ == "__main__":
    main()
