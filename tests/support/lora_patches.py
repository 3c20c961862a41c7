"""Checks of LoRA patches merged by ComfyUI, against the full tensors: every LoRA target weight equals
``W + strength * up.flatten(1) @ down.flatten(1)`` (a fused weight row block by row block, each against its
own pair), rows no pair targets and every other tensor of the state dict are unchanged.

Where each diffusers / transformers module lands in ComfyUI's state dict comes from ComfyUI's own key
converters (``comfy.utils.unet_to_diffusers``, ``comfy.utils.pixart_to_diffusers``: fused weights as row
offsets), never from the pack's code under test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# module name -> (state-dict key, rows of that weight, or None for the whole weight)
WeightMap = Mapping[str, tuple[str, slice | None]]


def _from_converter(converted: Mapping[str, object]) -> dict[str, tuple[str, slice | None]]:
    out: dict[str, tuple[str, slice | None]] = {}
    for diffusers_key, target in converted.items():
        if not diffusers_key.endswith(".weight"):
            continue
        if isinstance(target, tuple):  # (key, (dim, start, length)): a block of a fused weight
            key, (dim, start, length) = target
            assert dim == 0, f"{diffusers_key}: a fused block along dim {dim}"
            out[diffusers_key[: -len(".weight")]] = (key, slice(start, start + length))
        else:
            out[diffusers_key[: -len(".weight")]] = (target, None)
    return out


def sd1_weight_map(unet_config: Mapping) -> dict[str, tuple[str, slice | None]]:
    """diffusers U-Net module name -> ComfyUI ``diffusion_model`` state-dict key, by ComfyUI's converter."""
    import comfy.utils

    return _from_converter(comfy.utils.unet_to_diffusers(dict(unet_config)))


def pixart_weight_map(unet_config: Mapping) -> dict[str, tuple[str, slice | None]]:
    """diffusers PixArt module name -> ComfyUI key and rows (``qkv``: q, k, v; ``kv_linear``: k, v)."""
    import comfy.utils

    return _from_converter(comfy.utils.pixart_to_diffusers(dict(unet_config)))


def unet_weight_map(unet_config: Mapping) -> dict[str, tuple[str, slice | None]]:
    """:func:`sd1_weight_map` for any SD-style U-Net ComfyUI detected (SDXL, SSD-1B ...): the same converter."""
    return sd1_weight_map(unet_config)


def as_forward_sees(patcher, root: str = "diffusion_model") -> dict[str, torch.Tensor]:
    """``root``'s state dict with the weight of every ComfyUI op layer replaced by what its forward uses: ComfyUI's
    own ``comfy.ops.cast_bias_weight`` on the patcher's load device (it applies the on-the-fly LowVramPatch
    functions of a layer patched that way; a merged layer's weight as it is), brought to the CPU."""
    import comfy.ops
    import comfy.utils

    module = comfy.utils.get_attr(patcher.model, root)
    state = dict(module.state_dict())
    for name, layer in module.named_modules():
        if isinstance(layer, comfy.ops.CastWeightBiasOp) and getattr(layer, "weight", None) is not None:
            weight, _ = comfy.ops.cast_bias_weight(layer, dtype=layer.weight.dtype, device=patcher.load_device)
            state[f"{name}.weight"] = weight.detach().cpu()
    return state


def identity_weight_map(names: Sequence[str], prefix: str = "") -> dict[str, tuple[str, slice | None]]:
    """Module names that key the state dict as they are (a transformers model's own names)."""
    return {name: (f"{prefix}{name}.weight", None) for name in names}


def snapshot(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def assert_lora_merged(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    target_names: Sequence[str],
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    strength: float,
    weight_map: WeightMap,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> None:
    """Every target weight (or row block) == W + strength * up @ down (fp32), and nothing else changed.

    ``target_names[i]`` is the module that ``pairs[i]`` (``(up, down)``) patches.
    """
    assert len(target_names) == len(pairs), (len(target_names), len(pairs))
    assert after.keys() == before.keys()
    touched: dict[str, torch.Tensor] = {}  # key -> rows patched (bool per row)
    seen: set[tuple[str, int, int]] = set()
    for name, (up, down) in zip(target_names, pairs, strict=True):
        assert name in weight_map, f"{name}: ComfyUI's converter knows no such module"
        key, rows = weight_map[name]
        w_before, w_after = before[key], after[key]
        rows = rows or slice(0, w_before.shape[0])
        block = (key, rows.start, rows.stop)
        assert block not in seen, f"{name}: a second pair for {block}"
        seen.add(block)
        expected = w_before[rows].to(torch.float32, copy=True)  # never in place on the snapshot
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(expected.shape)
        expected.add_(delta, alpha=strength)
        # Max-norm bound (elementwise isclose costs minutes on a full-size U-Net's CPU tensors).
        error = (w_after[rows].float() - expected).abs_().max().item()
        bound = atol + rtol * expected.abs_().max().item()
        assert error <= bound, f"{name} -> {key}[{rows.start}:{rows.stop}]: max |error| {error:.3g} > {bound:.3g}"
        assert not torch.equal(w_after[rows], w_before[rows]), f"{name} -> {key}: not patched at all"
        mask = touched.setdefault(key, torch.zeros(w_before.shape[0], dtype=torch.bool))
        mask[rows] = True
    for key, mask in touched.items():
        if not mask.all():
            assert torch.equal(after[key][~mask], before[key][~mask]), f"{key}: rows no LoRA targets changed"
    changed = [k for k in before if k not in touched and not torch.equal(after[k], before[k])]
    assert not changed, f"{len(changed)} tensors no LoRA targets changed, e.g. {changed[:3]}"


def assert_state_equal(state: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor], what: str) -> None:
    """Bit-identical to the original (the same keys, every tensor torch.equal)."""
    assert state.keys() == original.keys(), what
    differ = [k for k in original if not torch.equal(state[k].cpu(), original[k].cpu())]
    assert not differ, f"{what}: {len(differ)} tensors differ from the originals, e.g. {differ[:3]}"


# ---- the official target order, from the official rule on diffusers' own classes (meta tensors) ----

SD1_TARGET_CLASSES = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}  # train/t5_unet.py VIS_REPLACE_MODULES
PIXART_TARGET_CLASSES = {"Attention", "GEGLU"}  # train/t5_transformer.py
TEXT_TARGET_CLASSES = {"t5": {"T5Attention"}, "llama": {"LlamaAttention"}}


def official_sd1_names() -> list[str]:
    """The modules of an SD1.x ``lora_vis.pt``, in order: the official traversal of diffusers' U-Net (its
    defaults are SD1.x's but for the 768-wide context), built on the meta device."""
    from diffusers import UNet2DConditionModel

    from .bridge_training import official_order

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    return official_order(unet, SD1_TARGET_CLASSES)


def official_pixart_names(num_layers: int = 28) -> list[str]:
    """The modules of a PixArt ``lora_vis.pt``: the official traversal of diffusers' PixArt-XL-2 transformer."""
    from diffusers import PixArtTransformer2DModel

    from .bridge_training import official_order

    with torch.device("meta"):
        model = PixArtTransformer2DModel(num_layers=num_layers)
    return official_order(model, PIXART_TARGET_CLASSES)


def official_text_names(model: torch.nn.Module, family: str) -> list[str]:
    from .bridge_training import official_order

    return official_order(model, TEXT_TARGET_CLASSES[family])
