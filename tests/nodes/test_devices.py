"""X2I models under ComfyUI's memory management, in the mode the device switch chose: ``--device cpu``
(ComfyUI's --cpu) or ``--device cuda`` with ``--comfy-vram normal``, ``lowvram`` or ``novram``.

- Every loader hands ComfyUI the devices ComfyUI uses for that kind of model: the text-encoder devices
  for encoders, GlueNets, adapters and language models; the diffusion-model devices for MODELs.
- Every encode node asks ComfyUI for a *full* load (these are plain PyTorch / Hugging Face modules: a
  partial load would leave layers on the offload device, unpatched), leaves its models whole on their
  load device, and gives float32 CONDITIONING on ComfyUI's intermediate device.
- The LaVi-Bridge LoRA is exactly W + s·up@down however ComfyUI places the U-Net (merged at load, or
  applied on the fly by LowVramPatch in lowvram / novram), on the language model too, and unloading
  restores every weight bit for bit.
- Twenty different prompts leave the live tensors, ComfyUI's loaded models and (CUDA) allocated memory
  where the first prompt left them.

One mode per process (ComfyUI reads its flags once): run this file once per mode, e.g.
``pytest tests/nodes/test_devices.py --device cuda --comfy-vram lowvram``.
"""

from __future__ import annotations

import gc
import inspect
import shutil
import warnings
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from transformers import T5EncoderModel

from support.models import (
    audioclip_full_checkpoint,
    fake_ulip_checkpoint,
    make_xlm_roberta_folder,
    official_layout,
    random_state_dict,
)
from support.sd15_unet import comfy_sd15_model, seeded_weight
from x2i.bridge import read_lora_pairs, text_lora_targets, unet_lora_targets
from x2i.encoders.pointcloud import PointCloud
from x2i.gluenet import GlueNet, GlueNetConfig, save_gluenet
from x2i.uvit import UViT, UViTConfig, save_uvit

pytestmark = pytest.mark.device

TEXT_ENCODER = "xlm-roberta-tiny"  # the `installed` fixture's encoder and French GlueNet
FRENCH_GLUENET = "gluenet_French_clip_overnorm_over3_noln.ckpt"
LANGUAGE_MODEL = "t5-devices"
AUDIOCLIP = "AudioCLIP-devices.pt"
CLAP = "clap-devices"
POINT_ENCODER = "ulip2-devices.pt"
UVIT = "uvit-devices.safetensors"
GLUENETS = {"audioclip": "gluenet_devices_audioclip.safetensors", "clap": "gluenet_devices_clap.safetensors",
            "points": "gluenet_devices_ulip2.safetensors"}
UNET_STRENGTH, TEXT_STRENGTH = 0.7, 0.5

# How far a LoRA-patched weight may sit from W + s·up@down (computed in float32 from the files), by the
# weight's dtype. float32 (CPU): ComfyUI merges in float32, rounding ~1e-7. float16 (a GPU U-Net, or an
# encoder in "auto"): the merge is rounded to float16 (stochastically when ComfyUI merges at load, in float16
# arithmetic when LowVramPatch patches on the fly), a few float16 ulps of |W| ≈ 0.02 (ulp 1.5e-5): bound
# 1.8e-4 there. The LoRA change itself, 0.7·up@down with rank-32 pairs of std 0.02, has std 1.6e-3 per weight:
# a layer patched wrongly, twice or not at all fails on most of its weights.
PATCH_TOLERANCE = {torch.float32: {"atol": 1e-6, "rtol": 1e-5}, torch.float16: {"atol": 1e-4, "rtol": 4e-3},
                   torch.bfloat16: {"atol": 8e-4, "rtol": 3e-2}}
# Twenty different prompts through one encode node; everything measured after the first must equal it.
LEAK_PROMPTS = 20
# CUDA: torch.cuda.memory_allocated() after prompt 20 may exceed its value after prompt 1 by at most this.
# Each prompt makes float16/float32 features of 77 x 48..768 (7-236 KB) on the GPU, so anything kept per
# prompt adds > 130 KB over 19 prompts: the bound is one such prompt's worth, and the CPU-side gc scan of
# this test (exact, on every device) catches the rest.
CUDA_ALLOCATED_GROWTH_BOUND = 128 * 1024
# Short-VRAM test (CUDA, normal mode): free memory left beside ComfyUI's minimum inference reserve. ComfyUI
# then lets a partial load use its 128 MiB floor, less than the released-size GlueNet (191 MiB float32),
# while the whole GlueNet and encoder (~210 MiB) still fit in the reserve.
SHORT_VRAM_HEADROOM = 64 * 1024 * 1024
PARTIAL_LOAD_FLOOR = 128 * 1024 * 1024  # comfy.model_management.load_models_gpu's minimum for a partial load


# --------------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def files(comfy, installed, tiny_t5, tiny_clap):
    """The pack's model files where users put them (random weights, real architectures)."""
    from support.models import write_lavibridge_folder

    folder_paths, models = comfy["folder_paths"], comfy["models"]
    extensions = {".pt", ".pth", ".ckpt", ".safetensors"}
    for name in ("audio_encoders", "point_encoders", "lavi_bridge", "diffusion_models"):
        folder = models / name
        folder.mkdir(exist_ok=True)
        paths, known = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if str(folder) not in paths:
            folder_paths.folder_names_and_paths[name] = ([str(folder), *paths], set(known) | extensions)
    audioclip_full_checkpoint(models / "audio_encoders" / AUDIOCLIP)
    shutil.copytree(tiny_clap, models / "audio_encoders" / CLAP, dirs_exist_ok=True)
    torch.save(fake_ulip_checkpoint("ulip2_colored", seed=3)[0], models / "point_encoders" / POINT_ENCODER)
    torch.manual_seed(0)
    for name, (tokens, width) in {"audioclip": (16, 64), "clap": (4, 8), "points": (20, 64)}.items():
        config = GlueNetConfig("translator_w_head", num_tokens=tokens, num_tokens_out=77, in_dim=width, out_dim=768, depth=3, mult=1)
        save_gluenet(GlueNet(config), models / "gluenet" / GLUENETS[name])
    shutil.copytree(tiny_t5, models / "text_encoders" / LANGUAGE_MODEL, dirs_exist_ok=True)
    t5 = T5EncoderModel.from_pretrained(tiny_t5)
    # "t5_unet": the released folder name tells the loader the recipe (a tiny T5's adapter width would not).
    write_lavibridge_folder(models / "lavi_bridge" / "t5_unet", t5, "t5", adapter_in=t5.config.d_model)
    save_uvit(UViT(UViTConfig(image_size=8, patch_size=2, width=64, depth=2, heads=1)), models / "diffusion_models" / UVIT)
    return models


@pytest.fixture(scope="module")
def sd15(comfy):
    """An SD1.5 MODEL as ComfyUI's Load Diffusion Model builds it: its dtype and devices for this mode."""
    return comfy_sd15_model()


# ------------------------------------------------------------------------------------------------- helpers


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def assert_whole_on_load_device(patcher, what: str, mm) -> None:
    """ComfyUI holds ``patcher`` loaded, fully (no lowvram layers, loaded size = model size), and every
    parameter and buffer of its module is on its load device."""
    assert any(loaded is patcher for loaded in mm.loaded_models()), f"{what}: not among ComfyUI's loaded models"
    model = patcher.model
    assert not model.model_lowvram, f"{what}: ComfyUI loaded it partially (lowvram)"
    assert patcher.loaded_size() == patcher.model_size(), (
        f"{what}: {patcher.loaded_size()} of {patcher.model_size()} bytes loaded on {patcher.load_device}")
    elsewhere = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if not _same_device(t.device, patcher.load_device)]
    assert not elsewhere, f"{what}: {len(elsewhere)} tensors not on {patcher.load_device}, e.g. {elsewhere[:3]}"


def assert_conditioning_where_comfyui_keeps_it(conditioning, mm) -> None:
    assert conditioning, "empty CONDITIONING"
    for tokens, options in conditioning:
        assert isinstance(options, dict)
        assert _same_device(tokens.device, mm.intermediate_device()), f"conditioning on {tokens.device}, not {mm.intermediate_device()}"
        assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()


class LoadRecorder:
    """Records the models and ``force_full_load`` of every ``load_models_gpu`` call, then calls ComfyUI's
    own function unchanged (a pass-through spy: nothing of ComfyUI's or the pack's behaviour is replaced)."""

    def __init__(self, mm, monkeypatch):
        self.calls: list[tuple[list, bool]] = []
        original = mm.load_models_gpu
        signature = inspect.signature(original)

        def recording(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls.append((list(bound.arguments["models"]), bool(bound.arguments["force_full_load"])))
            return original(*args, **kwargs)

        monkeypatch.setattr(mm, "load_models_gpu", recording)


def _audio(sample_rate: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"waveform": torch.randn(1, 2, sample_rate, generator=generator) * 0.2, "sample_rate": sample_rate}


def _sphere(count: int = 10_000, seed: int = 0) -> PointCloud:
    points = torch.randn(count, 3, generator=torch.Generator().manual_seed(seed))
    return PointCloud(points / points.norm(dim=1, keepdim=True), None, "sphere")


# Each encode node with "auto" dtype (what users get): returns (CONDITIONING, {what: ModelPatcher it loads}).
def _gluegen_text(pack, sd15):
    encoder = pack.X2ITextEncoderLoader.execute(TEXT_ENCODER, "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute(FRENCH_GLUENET, "from file").result[0]
    conditioning = pack.X2IGlueGenTextEncode.execute(encoder, gluenet, "Peinture impressionniste d'un jardin").result[0]
    return conditioning, {"XLM-R": encoder, "GlueNet": gluenet.patcher}


def _audioclip(pack, sd15):
    encoder = pack.X2IAudioEncoderLoader.execute(AUDIOCLIP, "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute(GLUENETS["audioclip"], "from file").result[0]
    return pack.X2IGlueGenAudioEncode.execute(encoder, gluenet, _audio(44100)).result[0], {"AudioCLIP": encoder, "GlueNet": gluenet.patcher}


def _clap(pack, sd15):
    encoder = pack.X2IAudioEncoderLoader.execute(CLAP, "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute(GLUENETS["clap"], "from file").result[0]
    return pack.X2IGlueGenAudioEncode.execute(encoder, gluenet, _audio(48000)).result[0], {"CLAP": encoder, "GlueNet": gluenet.patcher}


def _pointbert(pack, sd15):
    encoder = pack.X2IPointCloudEncoderLoader.execute(POINT_ENCODER, "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute(GLUENETS["points"], "from file").result[0]
    return pack.X2IGlueGenPointCloudEncode.execute(encoder, gluenet, _sphere()).result[0], {"PointBERT": encoder, "GlueNet": gluenet.patcher}


def _lavibridge(pack, sd15):
    lm = pack.X2ILanguageModelLoader.execute(LANGUAGE_MODEL, "auto").result[0]
    _, bridge = pack.X2ILaViBridgeLoader.execute(sd15, lm, "t5_unet", UNET_STRENGTH, TEXT_STRENGTH).result
    conditioning = pack.X2ILaViBridgeTextEncode.execute(bridge, "a red cube on a blue sphere", False).result[0]
    return conditioning, {"bridged T5": bridge.language_model, "adapter": bridge.adapter}


ENCODE_NODES: dict[str, Callable] = {
    "gluegen_text": _gluegen_text, "audioclip": _audioclip, "clap": _clap, "pointbert": _pointbert, "lavibridge": _lavibridge,
}


# --------------------------------------------------------------------------------------------------- tests


def test_comfyui_runs_in_the_mode_the_switch_chose(comfy, pytestconfig):
    mm = comfy["mm"]
    chosen, vram = pytestconfig.getoption("--device"), pytestconfig.getoption("--comfy-vram")
    assert mm.get_torch_device().type == chosen
    if chosen == "cpu":
        assert mm.vram_state == mm.VRAMState.DISABLED and mm.text_encoder_device().type == "cpu"
    elif vram in ("lowvram", "novram"):  # ComfyUI keeps text encoders on the CPU to save VRAM
        assert mm.text_encoder_device().type == "cpu" and mm.unet_offload_device().type == "cpu"
    assert mm.intermediate_device().type == "cpu"  # unless --gpu-only, which the switch never sets


def test_loaders_give_the_devices_comfyui_uses_for_that_kind_of_model(pack, comfy, files, sd15):
    mm = comfy["mm"]
    encoder_devices = (mm.text_encoder_device(), mm.text_encoder_offload_device())
    model_devices = (mm.get_torch_device(), mm.unet_offload_device())
    assert (sd15.load_device, sd15.offload_device) == model_devices  # ComfyUI's own loader, for reference
    lm = pack.X2ILanguageModelLoader.execute(LANGUAGE_MODEL, "auto").result[0]
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sd15, lm, "t5_unet", UNET_STRENGTH, TEXT_STRENGTH).result
    encoders = {
        "text encoder": pack.X2ITextEncoderLoader.execute(TEXT_ENCODER, "auto").result[0],
        "language model": lm,
        "GlueNet": pack.X2IGlueNetLoader.execute(FRENCH_GLUENET, "from file").result[0].patcher,
        "AudioCLIP": pack.X2IAudioEncoderLoader.execute(AUDIOCLIP, "auto").result[0],
        "CLAP": pack.X2IAudioEncoderLoader.execute(CLAP, "auto").result[0],
        "PointBERT": pack.X2IPointCloudEncoderLoader.execute(POINT_ENCODER, "auto").result[0],
        "LaVi-Bridge language model": bridge.language_model,
        "LaVi-Bridge adapter": bridge.adapter,
    }
    for what, patcher in encoders.items():
        assert (patcher.load_device, patcher.offload_device) == encoder_devices, what
        assert all(_same_device(p.device, patcher.offload_device) for p in patcher.model.parameters()), f"{what}: not loaded yet"
    models = {"LaVi-Bridge MODEL": bridged, "U-ViT": pack.X2IUViTLoader.execute(UVIT, "default").result[0]}
    for what, patcher in models.items():
        assert (patcher.load_device, patcher.offload_device) == model_devices, what


@pytest.mark.parametrize("node", list(ENCODE_NODES))
def test_encode_loads_its_models_whole_on_the_load_device(node, pack, comfy, files, sd15, monkeypatch):
    mm = comfy["mm"]
    mm.unload_all_models()
    recorder = LoadRecorder(mm, monkeypatch)
    conditioning, patchers = ENCODE_NODES[node](pack, sd15)
    # One load per encode, of exactly its models, asking for a full load as ComfyUI does for its own
    # modules without cast-on-the-fly weights (comfy/sd.py, CLIP): short of VRAM, a partial load would
    # leave plain layers on the offload device (a forward across two devices, their LoRA not applied).
    assert len(recorder.calls) == 1, f"{len(recorder.calls)} calls of load_models_gpu for one encode"
    (models, full), = recorder.calls
    assert {id(m) for m in models} == {id(p) for p in patchers.values()}, "load_models_gpu was not given exactly the node's models"
    assert full, f"load_models_gpu({', '.join(patchers)}) without force_full_load=True"
    for what, patcher in patchers.items():
        assert_whole_on_load_device(patcher, what, mm)
    assert_conditioning_where_comfyui_keeps_it(conditioning, mm)


def test_x2i_models_load_whole_when_vram_is_short(pack, comfy, files):
    """A released-size multilingual GlueNet (191 MiB) with VRAM so short that ComfyUI would load it in
    part: it must still load whole (CUDA, normal mode: where ComfyUI puts text encoders on the GPU)."""
    mm = comfy["mm"]
    if not mm.is_device_cuda(mm.text_encoder_device()):
        pytest.skip(f"ComfyUI puts text encoders on {mm.text_encoder_device()} in this mode: no VRAM to run short of")
    models = comfy["models"]
    make_xlm_roberta_folder(models / "text_encoders" / "xlm-roberta-1024", hidden=1024, layers=1, heads=8)
    torch.save(random_state_dict(official_layout("Translator_noln(77,1024,768,2,5)"), seed=7),
               models / "gluenet" / "gluenet_French_released_size.ckpt")
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-1024", "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_French_released_size.ckpt", "fr").result[0]
    assert gluenet.patcher.model_size() > PARTIAL_LOAD_FLOOR
    mm.unload_all_models()
    mm.soft_empty_cache(force=True)
    device = mm.get_torch_device()
    hog = torch.empty(int(mm.get_free_memory(device) - mm.minimum_inference_memory() - SHORT_VRAM_HEADROOM),
                      dtype=torch.uint8, device=device)
    try:
        assert mm.get_free_memory(device) < mm.minimum_inference_memory() + PARTIAL_LOAD_FLOOR  # really short
        conditioning = pack.X2IGlueGenTextEncode.execute(encoder, gluenet, "Un chat sur un toit").result[0]
        assert_whole_on_load_device(encoder, "XLM-R", mm)
        assert_whole_on_load_device(gluenet.patcher, "GlueNet", mm)
        assert_conditioning_where_comfyui_keeps_it(conditioning, mm)
    finally:
        del hog
        mm.unload_all_models()
        mm.soft_empty_cache(force=True)


def _effective_weight(patcher, key: str) -> torch.Tensor:
    """The weight ``key`` as the layer's forward sees it on the load device: ComfyUI's own cast, which
    applies the LowVramPatch functions of layers it patches on the fly (none when the layer was merged)."""
    import comfy.ops
    import comfy.utils

    module = comfy.utils.get_attr(patcher.model, key.rsplit(".", 1)[0])
    weight, _ = comfy.ops.cast_bias_weight(module, dtype=module.weight.dtype, device=patcher.load_device)
    return weight


def _unet_lora_layers(folder, unet_config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ComfyUI weight key -> (up, down) of lora_vis.pt, in the official order, through ComfyUI's own
    diffusers -> ComfyUI key map."""
    import comfy.utils

    to_comfy = {k[: -len(".weight")]: v for k, v in comfy.utils.unet_to_diffusers(unet_config).items() if k.endswith(".weight")}
    pairs = zip(unet_lora_targets(), read_lora_pairs(folder / "lora_vis.pt"), strict=True)
    return {f"diffusion_model.{to_comfy[target.name]}": pair for target, pair in pairs}


def assert_patched(actual: torch.Tensor, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, strength: float, what: str) -> None:
    """``actual`` (any device and dtype) is ``weight + strength * up @ down`` within :data:`PATCH_TOLERANCE`
    of ``actual``'s dtype (a cheaper, same-meaning check than torch.testing.assert_close on 860M values)."""
    tolerance = PATCH_TOLERANCE[actual.dtype]
    reference = weight.float() + strength * (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape)
    error = actual.float().cpu().sub_(reference).abs_()
    bound = reference.abs_().mul_(tolerance["rtol"]).add_(tolerance["atol"])
    assert bool((error <= bound).all()), f"{what}: off W + s·up@down by up to {error.max().item():.2e} ({actual.dtype})"


def test_lavibridge_lora_is_exact_in_this_memory_mode_and_unloading_restores_every_weight(pack, comfy, files, sd15):
    mm = comfy["mm"]
    mm.unload_all_models()
    lm = pack.X2ILanguageModelLoader.execute(LANGUAGE_MODEL, "auto").result[0]
    bridged, bridge = pack.X2ILaViBridgeLoader.execute(sd15, lm, "t5_unet", UNET_STRENGTH, TEXT_STRENGTH).result
    unet = bridged.model.diffusion_model
    dtype = next(unet.parameters()).dtype
    layers = _unet_lora_layers(files / "lavi_bridge" / "t5_unet", bridged.model.model_config.unet_config)
    assert set(bridged.patches) == set(layers)  # all 224 layers of lora_vis.pt, and nothing else

    mm.load_models_gpu([bridged])  # as KSampler does
    lowvram_layers = sum(1 for m in unet.modules() if getattr(m, "weight_function", None))
    if comfy["vram"] == "novram":
        assert bridged.model.model_lowvram and lowvram_layers > 0  # novram: ComfyUI patches every layer on the fly
    for key, (up, down) in layers.items():
        actual = _effective_weight(bridged, key)
        assert _same_device(actual.device, bridged.load_device)
        original = seeded_weight(key.removeprefix("diffusion_model."), actual.shape).to(dtype)  # as ComfyUI stored it
        assert_patched(actual, original, up, down, UNET_STRENGTH, key)

    # The text LoRA: merged into the language model, which is loaded whole (see test_encode_...).
    pack.X2ILaViBridgeTextEncode.execute(bridge, "a cat", False)
    reference_lm = T5EncoderModel.from_pretrained(files / "text_encoders" / LANGUAGE_MODEL).to(lm.model.dtype)
    original_lm = {f"transformer.{k}": v for k, v in reference_lm.state_dict().items()}
    text_pairs = read_lora_pairs(files / "lavi_bridge" / "t5_unet" / "lora_text.pt")
    lm_state = bridge.language_model.model.state_dict()
    for target, (up, down) in zip(text_lora_targets(reference_lm, "t5"), text_pairs, strict=True):
        key = f"transformer.{target.name}.weight"
        assert_patched(lm_state[key], original_lm[key], up, down, TEXT_STRENGTH, key)

    mm.unload_all_models()  # ComfyUI detaches and unpatches: every weight must be the original again
    assert not bridged.backup and not bridged.model.model_lowvram
    leftover = [name for name, m in unet.named_modules() if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)]
    assert not leftover, f"{len(leftover)} layers keep on-the-fly patches, e.g. {leftover[:3]}"
    changed = [key for key, value in unet.state_dict().items()
               if not _same_device(value.device, bridged.offload_device)
               or not torch.equal(value.cpu(), seeded_weight(key, value.shape).to(value.dtype))]
    assert not changed, f"{len(changed)} U-Net weights differ from the original after unloading, e.g. {changed[:3]}"
    lm_changed = [key for key, value in bridge.language_model.model.state_dict().items()
                  if key in original_lm and not torch.equal(value.cpu(), original_lm[key])]
    assert not lm_changed, f"language-model weights differ from the original after unloading: {lm_changed[:3]}"


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a dead weakref.proxy
        return False


def live_tensors() -> dict[str, tuple[int, int]]:
    """Device -> (number, total bytes) of the tensors Python can reach (a full gc scan)."""
    gc.collect()
    counts: Counter = Counter()
    sizes: Counter = Counter()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch aliases warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if _is_tensor(obj)]
    for obj in tensors:
        counts[str(obj.device)] += 1
        sizes[str(obj.device)] += obj.nelement() * obj.element_size()
    return {device: (counts[device], sizes[device]) for device in counts}


LEAK_WORDS = ("rouge", "bleu", "vert", "jaune", "noir", "blanc", "gris", "rose", "violet", "orange",
              "brun", "doré", "argenté", "clair", "sombre", "vif", "pâle", "chaud", "froid", "calme")


def _gluegen_encoder(pack, sd15) -> Callable[[str], list]:
    """Loaders run once, as ComfyUI caches their outputs; the returned function runs the encode node."""
    encoder = pack.X2ITextEncoderLoader.execute(TEXT_ENCODER, "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute(FRENCH_GLUENET, "from file").result[0]
    return lambda word: pack.X2IGlueGenTextEncode.execute(encoder, gluenet, f"Un jardin {word} au printemps").result[0]


def _lavibridge_encoder(pack, sd15) -> Callable[[str], list]:
    lm = pack.X2ILanguageModelLoader.execute(LANGUAGE_MODEL, "auto").result[0]
    _, bridge = pack.X2ILaViBridgeLoader.execute(sd15, lm, "t5_unet", UNET_STRENGTH, TEXT_STRENGTH).result
    return lambda word: pack.X2ILaViBridgeTextEncode.execute(bridge, f"a {word} garden in spring", False).result[0]


@pytest.mark.parametrize("encoder", [_gluegen_encoder, _lavibridge_encoder], ids=["gluegen_text", "lavibridge"])
def test_twenty_prompts_leak_nothing(encoder, pack, comfy, files, sd15):
    mm = comfy["mm"]
    assert len(set(LEAK_WORDS)) == LEAK_PROMPTS
    mm.unload_all_models()
    encode = encoder(pack, sd15)
    cuda = mm.get_torch_device().type == "cuda"
    measured = []
    for word in LEAK_WORDS:
        conditioning = encode(word)
        assert conditioning[0][0].shape[:2] == (1, 77)
        del conditioning
        if cuda:
            torch.cuda.synchronize()
        measured.append({"tensors": live_tensors(), "loaded models": len(mm.current_loaded_models),
                         "cuda allocated": torch.cuda.memory_allocated() if cuda else 0})
    first = measured[0]
    for index, now in enumerate(measured[1:], start=2):
        assert now["tensors"] == first["tensors"], f"live tensors after prompt {index}: {now['tensors']}, after prompt 1: {first['tensors']}"
        assert now["loaded models"] == first["loaded models"], f"prompt {index}"
        growth = now["cuda allocated"] - first["cuda allocated"]
        assert growth <= CUDA_ALLOCATED_GROWTH_BOUND, f"CUDA memory allocated grew by {growth} bytes from prompt 1 to prompt {index}"
