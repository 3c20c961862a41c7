"""Bridge-trainer models and outputs: SD1.x single files converted by diffusers (and wrong files named),
diffusers SD1.x / PixArt folders, peft LoRA on exactly the official layers, and the two output formats —
the released layout round-tripping through bridge/'s readers onto the right modules, and this pack's file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import support.bridge_training as bt
from x2i.bridge import (
    LaViBridgeFileError,
    load_adapter,
    map_lora_pairs,
    read_lora_pairs,
    text_lora_targets,
    unet_lora_targets,
)
from x2i.bridge.adapter import TextAdapter, TextAdapterConfig
from x2i.bridge.lora import merged_state, pixart_lora_targets
from x2i.bridge.trained import (
    export_released_layout,
    is_trained_bridge_file,
    load_trained_bridge,
    save_trained_bridge,
    write_released_layout,
)
from x2i.training.bridge_task import inject_lora, lora_pairs
from x2i.training.diffusion_models import (
    SD1_UNET_CONFIG,
    SD1_VAE_CONFIG,
    DiffusionModelError,
    load_diffusion_model,
)

UNET_CLASSES = {"ResnetBlock2D", "Attention", "GEGLU"}
TINY = {"unet_config": bt.TINY_UNET_CONFIG, "vae_config": bt.TINY_VAE_CONFIG}


# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- SD1.x single files ----------------------------------------------------------------------------


def test_sd1_single_file_is_converted_exactly_by_diffusers(tmp_path):
    path, unet, vae = bt.write_sd1_single_file(tmp_path / "tiny-sd1.safetensors")
    model = load_diffusion_model(path, **TINY)
    assert model.kind == "sd1" and model.context_dim == 32 and model.scaling_factor == 0.18215
    assert same_state(model.denoiser, unet) and same_state(model.vae, vae)
    assert not any(p.requires_grad for p in [*model.denoiser.parameters(), *model.vae.parameters()])
    schedule = model.scheduler.config
    assert (schedule.beta_schedule, schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert [t.name for t in model.lora_targets()] == bt.official_order(unet, UNET_CLASSES)
    half = load_diffusion_model(path, dtype=torch.bfloat16, **TINY)
    assert {p.dtype for p in half.denoiser.parameters()} == {torch.bfloat16}


def test_sd15_layout_and_config_agree_at_full_size():
    """The explicit SD1.5 configs and diffusers' converter, on the real key layout (meta tensors: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD1_UNET_CONFIG)
        vae = AutoencoderKL(**SD1_VAE_CONFIG)
    ldm = {f"model.diffusion_model.{k}": v for k, v in bt.ldm_unet_state(unet).items()}
    assert ldm["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # SD1's first upsampler, as in v1-5 files
    converted = convert_ldm_unet_checkpoint(ldm, SD1_UNET_CONFIG)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    vae_ldm = {f"first_stage_model.{k}": v for k, v in bt.ldm_vae_state(vae).items()}
    assert vae_ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    converted = convert_ldm_vae_checkpoint(vae_ldm, SD1_VAE_CONFIG)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in vae.state_dict().items()}
    targets = unet_lora_targets(SD1_UNET_CONFIG)
    assert len(targets) == 224 and [t.name for t in targets] == bt.official_order(unet, UNET_CLASSES)


def test_single_file_without_vae_takes_a_separate_vae_file(tmp_path):
    path, unet, _ = bt.write_sd1_single_file(tmp_path / "unet-only.safetensors", with_vae=False)
    with pytest.raises(DiffusionModelError, match="holds no VAE.*model.vae"):
        load_diffusion_model(path, **TINY)
    other = bt.tiny_vae(seed=7)
    vae_file = tmp_path / "vae-ft-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bt.ldm_vae_state(other).items()}, str(vae_file))  # no prefix, as vae-ft-mse
    model = load_diffusion_model(path, vae=vae_file, **TINY)
    assert same_state(model.vae, other) and same_state(model.denoiser, unet)
    other.save_pretrained(tmp_path / "vae-folder")
    assert same_state(load_diffusion_model(path, vae=tmp_path / "vae-folder", **TINY).vae, other)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        ("sdxl", "is an SDXL checkpoint"),
        ("sd2", "is an SD2.x checkpoint \\(text context 1024 wide, SD1.x has 32\\)"),
        ("inpaint", "takes 9 input channels \\(an inpainting"),
        ("diffusers_unet", "diffusers U-Net weight file: give the whole diffusers folder"),
        ("vae", "standalone VAE: set it as model.vae"),
        ("other", "not a Stable Diffusion checkpoint \\(2 tensors"),
        ("garbage", "not a readable safetensors file"),
        ("pickle", "could not be read as a safe PyTorch checkpoint"),
    ],
)
def test_wrong_single_files_are_named(tmp_path, build, message):
    path = tmp_path / "model.safetensors"
    if build == "sdxl":
        bt.write_sd1_single_file(path, extra={"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)})
    elif build in ("sd2", "inpaint"):
        unet = bt.tiny_unet(**({"cross_attention_dim": 1024} if build == "sd2" else {"in_channels": 9}))
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bt.ldm_unet_state(unet).items()}, str(path))
    elif build == "diffusers_unet":
        save_file(bt.tiny_unet().state_dict(), str(path))
    elif build == "vae":
        save_file({k: v.contiguous() for k, v in bt.ldm_vae_state(bt.tiny_vae()).items()}, str(path))
    elif build == "other":
        save_file({"blocks.0.weight": torch.zeros(2), "tail.bias": torch.zeros(2)}, str(path))
    elif build == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"cos\nsystem\n(S'echo no'\ntR.")
    with pytest.raises(DiffusionModelError, match=message):
        load_diffusion_model(path, **TINY)


# ---- diffusers folders ---------------------------------------------------------------------------------


def test_diffusers_folders_sd1_and_pixart(tmp_path):
    sd = load_diffusion_model(bt.make_sd1_folder(tmp_path / "sd"))
    assert sd.kind == "sd1" and sd.vae is not None and sd.context_dim == 32
    pixart_folder = bt.make_pixart_folder(tmp_path / "pixart")
    pixart = load_diffusion_model(pixart_folder, kind="pixart")
    assert pixart.kind == "pixart" and pixart.context_dim == 32 and pixart.learned_sigma
    assert pixart.scheduler.config.beta_schedule == "linear" and pixart.scheduler.config.beta_end == 0.02
    targets = pixart.lora_targets()
    assert targets == pixart_lora_targets(2, 16)
    assert [t.name for t in targets] == bt.official_order(pixart.denoiser, {"Attention", "GEGLU"})
    # ε is the first half of PixArt's 8 output channels; the mask hides padded caption tokens.
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context, mask = torch.randn(2, 6, 32), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        eps = pixart.predict_noise(noisy, t, context, mask)
        full = pixart.denoiser(noisy, encoder_hidden_states=context, timestep=t, encoder_attention_mask=mask,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        padded_changed = context.clone()
        padded_changed[0, 3:] = 5.0
        same = pixart.predict_noise(noisy, t, padded_changed, mask)
    assert eps.shape == (2, 4, 8, 8) and torch.equal(eps, full[:, :4])
    torch.testing.assert_close(same, eps)
    with pytest.raises(DiffusionModelError, match="looks like a pixart model, but model.kind says sd1"):
        load_diffusion_model(pixart_folder, kind="sd1")


def test_unusable_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffusionModelError, match="neither a single-file SD1.x checkpoint nor a diffusers folder"):
        load_diffusion_model(tmp_path / "empty")
    folder = bt.make_sd1_folder(tmp_path / "sd")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
    }))
    with pytest.raises(DiffusionModelError, match="predicts 'v_prediction'"):
        load_diffusion_model(folder)
    bt.tiny_unet().save_pretrained(tmp_path / "novae" / "unet")
    with pytest.raises(DiffusionModelError, match="no vae/ folder"):
        load_diffusion_model(tmp_path / "novae")


# ---- LoRA: exactly the official layers, exported in the released layout --------------------------------


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Give every LoRA pair fp16-representable random values (so the fp16 export loses nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).half().float())


def _text_model(family: str, folder: Path):
    from x2i.bridge.language_models import load_language_model

    return load_language_model(folder, "t5_unet" if family == "t5" else "llama2_unet", dtype=torch.float32).transformer


def test_peft_lora_sits_on_exactly_the_official_layers_and_the_released_files_reproduce_it(tmp_path, tiny_t5, tiny_llama):
    unet, base_unet = bt.tiny_unet(), bt.tiny_unet()
    vision_targets = unet_lora_targets(unet.config)
    inject_lora(unet, vision_targets, rank=4, dropout=0.1)
    wrapped = sorted(n for n, m in unet.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == sorted(t.name for t in vision_targets)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        f"{t.name}.lora_{ab}.default.weight" for t in vision_targets for ab in "AB"}
    sample, steps, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 7, 32)
    unet.eval()
    with torch.no_grad():
        # up = 0 at the start: the model is unchanged; down ~ N(0, 1/rank).
        torch.testing.assert_close(unet(sample, steps, context).sample, base_unet(sample, steps, context).sample)
    down = unet.get_submodule(vision_targets[0].name).lora_A["default"].weight
    assert 0.15 < down.std().item() < 0.35  # 1/rank = 0.25
    _randomise_lora(unet, 0)

    texts = {}
    for family, folder in (("t5", tiny_t5), ("llama", tiny_llama)):
        model, base = _text_model(family, folder), _text_model(family, folder)
        targets = text_lora_targets(model, family)
        inject_lora(model, targets, rank=4, dropout=0.0)
        _randomise_lora(model, 1)
        texts[family] = (model.eval(), base, targets)

    adapter = TextAdapter(TextAdapterConfig(48, 40, 32))
    out = write_released_layout(
        tmp_path / "released", adapter=adapter, vision_pairs=list(lora_pairs(unet, vision_targets).values()),
        text_pairs=list(lora_pairs(*texts["t5"][::2]).values()),
    )
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "lora_text.pt", "lora_vis.pt"]
    raw = torch.load(out / "lora_vis.pt", weights_only=True)
    assert isinstance(raw, list) and {t.dtype for t in raw} == {torch.float16}
    assert raw[0].shape == (32, 4) and raw[1].shape == (4, 32)  # up first: attn1.to_q of the first block

    # bridge/'s readers map the released list onto exactly the modules peft trained, and merging it
    # (scale 1.0) reproduces the LoRA model.
    mapped = map_lora_pairs(read_lora_pairs(out / "lora_vis.pt"), unet_lora_targets(base_unet.config), "lora_vis.pt")
    assert list(mapped) == bt.official_order(base_unet, UNET_CLASSES)
    for name, (up, down) in mapped.items():
        layer = unet.get_submodule(name)
        assert torch.equal(up.float(), layer.lora_B["default"].weight) and torch.equal(down.float(), layer.lora_A["default"].weight)
    base_unet.load_state_dict(merged_state(base_unet.state_dict(), mapped), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(base_unet(sample, steps, context).sample, unet(sample, steps, context).sample, atol=1e-4, rtol=1e-4)

    t5, t5_base, _ = texts["t5"]
    mapped = map_lora_pairs(read_lora_pairs(out / "lora_text.pt"), text_lora_targets(t5_base, "t5"), "lora_text.pt")
    t5_base.load_state_dict(merged_state(t5_base.state_dict(), mapped), strict=False)
    ids = torch.tensor([[5, 6, 7, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(t5_base(input_ids=ids).last_hidden_state, t5(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-4)

    llama, llama_base, targets = texts["llama"]
    write_released_layout(tmp_path / "llama", adapter=adapter, vision_pairs=list(mapped.values()), text_pairs=list(lora_pairs(llama, targets).values()))
    mapped = map_lora_pairs(read_lora_pairs(tmp_path / "llama" / "lora_text.pt"), text_lora_targets(llama_base, "llama"), "lora_text.pt")
    assert list(mapped)[:4] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj"]
    llama_base.load_state_dict(merged_state(llama_base.state_dict(), mapped), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(llama_base(input_ids=ids).last_hidden_state, llama(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-4)

    loaded = load_adapter(out / "adapter")
    assert loaded.config == adapter.config and same_state(loaded, adapter)
    config = json.loads((out / "adapter" / "config.json").read_text())
    assert config["_class_name"] == "TextAdapter" and (config["in_dim"], config["int_dim"], config["out_dim"]) == (48, 40, 32)


# ---- this pack's bridge file ------------------------------------------------------------------------


def _pairs(shapes: list[tuple[str, tuple, tuple]], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(up, generator=g).half(), torch.randn(down, generator=g).half()) for name, up, down in shapes}


@pytest.fixture()
def bridge_file(tmp_path):
    adapter = TextAdapter(TextAdapterConfig(48, 40, 32))
    vision = _pairs([("down_blocks.0.resnets.0.conv1", (32, 4, 1, 1), (4, 32, 3, 3)), ("mid_block.attentions.0.x.to_q", (64, 4), (4, 64))], 0)
    text = _pairs([("encoder.block.0.layer.0.SelfAttention.q", (48, 4), (4, 48))], 1)
    path = save_trained_bridge(
        tmp_path / "my_bridge.safetensors", recipe="t5_unet", diffusion_model="sd1", adapter=adapter, vision_lora=vision,
        text_lora=text, context_dim=32, language_model="t5-tiny", training_config={"lora": {"rank": 4}},
    )
    return path, adapter, vision, text


def test_pack_bridge_file_round_trips(bridge_file, tmp_path):
    path, adapter, vision, text = bridge_file
    bridge = load_trained_bridge(path)
    assert (bridge.recipe.value, bridge.language_model_family, bridge.diffusion_model) == ("t5_unet", "t5", "sd1")
    assert (bridge.max_length, bridge.use_attention_mask, bridge.rank, bridge.context_dim) == (77, False, 4, 32)
    assert list(bridge.vision_lora) == list(vision) and list(bridge.text_lora) == list(text)
    for mine, theirs in ((bridge.vision_lora, vision), (bridge.text_lora, text)):
        assert all(torch.equal(mine[k][0], theirs[k][0]) and torch.equal(mine[k][1], theirs[k][1]) for k in theirs)
    assert same_state(bridge.adapter, adapter) and not bridge.adapter.training
    assert bridge.training_config == {"lora": {"rank": 4}} and bridge.metadata["language_model"] == "t5-tiny"
    assert is_trained_bridge_file(path)
    released = export_released_layout(bridge, tmp_path / "released")
    assert [p[0].shape for p in read_lora_pairs(released / "lora_vis.pt")] == [v[0].shape for v in vision.values()]
    assert same_state(load_adapter(released / "adapter"), adapter)


def test_pack_bridge_file_for_pixart_keeps_the_mask_recipe(tmp_path):
    adapter = TextAdapter(TextAdapterConfig(48, 40, 32))
    vision = _pairs([("transformer_blocks.0.attn1.to_q", (16, 4), (4, 16))], 2)
    path = save_trained_bridge(tmp_path / "p.safetensors", recipe="t5_transformer", diffusion_model="pixart", adapter=adapter,
                               vision_lora=vision, text_lora={}, context_dim=32)
    bridge = load_trained_bridge(path)
    assert (bridge.max_length, bridge.use_attention_mask, bridge.text_lora) == (120, True, {})
    with pytest.raises(LaViBridgeFileError, match="without a language-model LoRA"):
        export_released_layout(bridge, tmp_path / "released")
    with pytest.raises(ValueError, match="not the recipe of a t5 bridge to sd1"):
        save_trained_bridge(tmp_path / "x.safetensors", recipe="t5_transformer", diffusion_model="sd1", adapter=adapter,
                            vision_lora=vision, text_lora={}, context_dim=32)


def test_wrong_bridge_files_are_named(bridge_file, tmp_path):
    from safetensors import safe_open

    path, *_ = bridge_file
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    def write(name, tensors=tensors, **meta):
        target = tmp_path / name
        save_file(tensors, str(target), metadata=None if "plain" in meta else {**metadata, **meta})
        return target

    cases = {
        write("gluenet.safetensors", format="x2i.gluenet"): "a GlueNet of this pack",
        write("ckpt.safetensors", format="x", **{"x2i.checkpoint": "{}"}): "a training checkpoint",
        write("newer.safetensors", format_version="3"): "format version '3'.*reads versions 1, 2. Update the node pack",
        write("plain.safetensors", {"lora_unet_down.lora_A.weight": torch.zeros(1)}, plain=None): "named LoRA for another loader",
        write("extra.safetensors", {**tensors, "vision.stray.lora_up.weight": torch.zeros(1)}): "not listed in its metadata",
        write("missing.safetensors", {k: v for k, v in tensors.items() if not k.startswith("text.")}): "listed but its tensors are missing",
        write("recipe.safetensors", recipe="t5_sdxl"): "recipe 't5_sdxl' is unknown",
        write("mask.safetensors", use_attention_mask="true"): "differ from recipe t5_unet",
    }
    (tmp_path / "lora_vis.safetensors").write_bytes(b"PK\x03\x04 a torch zip")
    cases[tmp_path / "lora_vis.safetensors"] = "not a readable safetensors file"
    cases[tmp_path / "nothing.safetensors"] = "not found"
    for target, message in cases.items():
        with pytest.raises(LaViBridgeFileError, match=message):
            load_trained_bridge(target)
        # Listing reads metadata only: a file that is not this format is never offered.
        assert is_trained_bridge_file(target) == (target.stem in ("extra", "missing", "recipe", "mask"))


_FULL_DISK_WRITES = """
import hashlib, json, resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import support  # noqa: F401
import torch
from x2i.bridge.adapter import TextAdapter, TextAdapterConfig
from x2i.bridge.trained import save_trained_bridge, write_released_layout

folder = Path(sys.argv[2])
small = TextAdapter(TextAdapterConfig(8, 8, 8))
big = TextAdapter(TextAdapterConfig(64, 64, 32))  # ~25 KB of weights
tiny_pairs = [(torch.zeros(8, 2).half(), torch.zeros(2, 8).half())]
big_pairs = [(torch.randn(64, 32).half(), torch.randn(32, 64).half())] * 2  # 16 KB
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
outcomes = {}
attempts = {
    "lora_vis": lambda: write_released_layout(folder / "released", adapter=small, vision_pairs=big_pairs, text_pairs=tiny_pairs),
    "adapter": lambda: write_released_layout(folder / "released", adapter=big, vision_pairs=tiny_pairs, text_pairs=tiny_pairs),
    "bridge": lambda: save_trained_bridge(folder / "bridge.safetensors", recipe="t5_unet", diffusion_model="sd1", adapter=big,
                                          vision_lora={"a.to_q": big_pairs[0]}, text_lora={}, context_dim=32),
}
for name, attempt in attempts.items():
    try:
        attempt()
        outcomes[name] = "written"
    except Exception as exc:
        outcomes[name] = f"{type(exc).__name__}: {exc}"
    if name == "lora_vis":  # rewritten (complete) by the next attempt, so looked at now
        outcomes["lora_vis_sha256"] = hashlib.sha256((folder / "released" / "lora_vis.pt").read_bytes()).hexdigest()
print(json.dumps(outcomes))
"""


def test_bridge_writes_on_a_full_disk_keep_the_previous_files_and_leave_no_temp_file(tmp_path):
    import hashlib
    import subprocess
    import sys

    small = TextAdapter(TextAdapterConfig(8, 8, 8))
    tiny = [(torch.ones(8, 2).half(), torch.ones(2, 8).half())]
    released = write_released_layout(tmp_path / "released", adapter=small, vision_pairs=tiny, text_pairs=tiny)
    bridge = save_trained_bridge(tmp_path / "bridge.safetensors", recipe="t5_unet", diffusion_model="sd1",
                                 adapter=TextAdapter(TextAdapterConfig(8, 8, 8)), vision_lora={"a.to_q": tiny[0]}, text_lora={},
                                 context_dim=8)
    before = {p: p.read_bytes() for p in [*released.rglob("*"), bridge] if p.is_file()}
    child = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITES, str(Path(__file__).resolve().parents[1]), str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    outcomes = json.loads(child.stdout.strip().splitlines()[-1])
    # Each failure is an OSError naming the file (the trainer turns it into its own error line).
    assert outcomes["lora_vis"].startswith(f"OSError: cannot write {released / 'lora_vis.pt'} (")
    assert outcomes["adapter"].startswith(f"OSError: cannot write {released / 'adapter' / 'diffusion_pytorch_model.safetensors'} (")
    assert outcomes["bridge"].startswith(f"OSError: cannot write {bridge} (")
    # The file that failed keeps its previous content; nothing half-written is left anywhere.
    assert outcomes["lora_vis_sha256"] == hashlib.sha256(before[released / "lora_vis.pt"]).hexdigest()
    for path in (released / "adapter" / "diffusion_pytorch_model.safetensors", released / "adapter" / "config.json", bridge):
        assert path.read_bytes() == before[path], path
    assert not [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert same_state(load_adapter(released / "adapter"), small) and load_trained_bridge(bridge).context_dim == 8
