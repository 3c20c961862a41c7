"""The U-ViT loader inside ComfyUI: every file layout becomes a MODEL that ComfyUI's own samplers run,
whose denoiser is exactly U-ViT's ε-prediction at U-ViT's time n = ComfyUI's index + 1 on latents at
U-ViT's scale; long, narrow or wide conditionings and other architectures are handled clearly."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from support.comfy_sampling import sample_latent
from support.precision import assert_close_in_half
from x2i.uvit import UViT, UViTConfig, UViTFileError, save_uvit
from x2i.uvit.checkpoint import LAYOUT_UVIT, from_pack_layout
from x2i.uvit.model import UViTInputError

SIDE = 8  # latent side: 64-pixel images
CONTEXT = (77, 768)  # one CLIP ViT-L/14 chunk, what CLIPTextEncode gives SD1.x
# heads = width // 64: what .pth files imply (their head count is not in the weights)
CONFIGS = {
    "concat": UViTConfig(image_size=SIDE, patch_size=2, width=128, depth=4, heads=2),
    "cross": UViTConfig("cross", "intermediate", n_image=1, n_text=1, image_size=SIDE, patch_size=2, width=128, depth=4, heads=2),
}
# file name -> (config, how it is written)
FILES = {
    "tiny_concat.safetensors": ("concat", "x2i"),
    "tiny_concat_fork.pth": ("concat", "fork"),
    "tiny_concat_uvit.pth": ("concat", "uvit"),
    "tiny_cross.safetensors": ("cross", "x2i"),
    "tiny_cross_fork.pth": ("cross", "fork"),
}


def reference_uvit(kind: str) -> UViT:
    """A tiny U-ViT with weights big enough that every path (time, text, position) shows."""
    torch.manual_seed({"concat": 1, "cross": 2}[kind])
    model = UViT(CONFIGS[kind]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uvit_files(comfy):
    """The files in models/diffusion_models, plus an SD U-Net and a broken file in the same folder."""
    folder_paths = comfy["folder_paths"]
    folder = comfy["models"] / "diffusion_models"
    folder.mkdir(exist_ok=True)
    paths, extensions = folder_paths.folder_names_and_paths["diffusion_models"]
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(folder), *paths], extensions)
    for name, (kind, layout) in FILES.items():
        model = reference_uvit(kind)
        if layout == "x2i":
            save_uvit(model, folder / name)
        elif layout == "fork":
            torch.save(model.state_dict(), folder / name)
        else:
            torch.save(from_pack_layout(model.state_dict(), model.config, LAYOUT_UVIT), folder / name)
    sd_unet = {"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3), "middle_block.1.proj_in.weight": torch.zeros(4, 4)}
    save_file(sd_unet, str(folder / "sd15_unet.safetensors"))
    torch.save({f"model.diffusion_model.{k}": v for k, v in sd_unet.items()}, folder / "sd15_unet.pth")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def loaded(pack, uvit_files):
    return {name: pack.X2IUViTLoader.execute(name, "default").result[0] for name in FILES}


def uvit_schedule() -> torch.Tensor:
    """ᾱ_n for n = 1..1000 as U-ViT computes it (SD's scaled-linear β, float64): index n - 1."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def conditioning(tokens: int = 77, width: int = 768, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=g), {}]]


sample = partial(sample_latent, side=SIDE)


# --- loading ----------------------------------------------------------------------------------------


def test_loader_lists_the_folder_and_loads_every_layout_as_a_model(pack, loaded):
    from x2i.nodes.uvit import UViTBaseModel

    options = pack.X2IUViTLoader.define_schema().inputs[0].options
    assert set(FILES) <= set(options)
    for name, (kind, _) in FILES.items():
        patcher = loaded[name]
        model = patcher.model
        assert isinstance(model, UViTBaseModel) and isinstance(model.diffusion_model, UViT)
        assert model.diffusion_model.config == CONFIGS[kind]
        # ComfyUI's dtype choice: float32 on the CPU, its half precision on a GPU.
        assert model.get_dtype() in ((torch.float32,) if patcher.load_device.type == "cpu" else (torch.float16, torch.bfloat16, torch.float32))
        assert model.model_type.name == "EPS"
        assert model.latent_format.scale_factor == pytest.approx(0.23010)
        reference = reference_uvit(kind).state_dict()
        state = model.diffusion_model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k].cpu(), reference[k].to(state[k].dtype)) for k in reference), name


def test_comfyui_schedule_is_uvits(loaded):
    sigmas = loaded["tiny_concat.safetensors"].model.model_sampling.sigmas.double()
    alphas = uvit_schedule()
    torch.testing.assert_close(sigmas, ((1 - alphas) / alphas).sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", sorted(FILES))
def test_denoiser_is_uvit_at_t_plus_one_on_scaled_latents(name, loaded, comfy):
    """ComfyUI's denoiser at U-ViT time n equals U-ViT's own x0 prediction from ε(x_n, n, text): exactly in
    float32 (the CPU); on a GPU, where ComfyUI runs U-ViT in half precision, its ε within the half tolerance."""
    patcher = loaded[name]
    model = patcher.model
    comfy["mm"].load_models_gpu([patcher])
    device, dtype = patcher.load_device, model.get_dtype()
    kind = FILES[name][0]
    reference = reference_uvit(kind)
    g = torch.Generator().manual_seed(3)
    vae_latent = torch.randn(2, 4, SIDE, SIDE, generator=g)
    z0 = model.process_latent_in(vae_latent)
    torch.testing.assert_close(z0, vae_latent * 0.23010)
    noise = torch.randn(2, 4, SIDE, SIDE, generator=g)
    text = torch.randn(2, *CONTEXT, generator=g)
    alphas = uvit_schedule()
    for n in (1, 37, 500, 1000):  # U-ViT's times, 1..1000
        a = alphas[n - 1]
        x_n = (a.sqrt() * z0 + (1 - a).sqrt() * noise).float()  # U-ViT's forward process
        sigma = ((1 - a) / a).sqrt().float()
        with torch.no_grad():
            eps = reference(x_n, torch.full((2,), float(n)), text)
            shifted = reference(x_n, torch.full((2,), float(n - 1)), text)
            x = x_n / a.sqrt().float()  # ComfyUI's x = x0 + σ ε
            denoised = model.apply_model(x.to(device), sigma.expand(2).to(device), c_crossattn=text.to(device)).float().cpu()
        if dtype == torch.float32:
            torch.testing.assert_close(denoised, x - sigma * eps, atol=2e-5, rtol=2e-5)
        else:  # x0 = x - σ ε cancels for large σ: compare the network's ε
            assert_close_in_half((x - denoised) / sigma, eps, dtype, f"ε at n={n}")
        if n > 1:
            assert (eps - shifted).abs().max() > 1e-3  # the offset matters: n - 1 would be another time


def test_the_three_layouts_give_the_same_model(loaded, comfy):
    x = torch.randn(1, 4, SIDE, SIDE)
    text = torch.randn(1, *CONTEXT)
    sigma = torch.tensor([2.0])
    comfy["mm"].load_models_gpu(list(loaded.values()))
    device = loaded["tiny_concat.safetensors"].load_device
    outputs = {name: loaded[name].model.apply_model(x.to(device), sigma.to(device), c_crossattn=text.to(device)).cpu() for name in FILES}
    for name in ("tiny_concat_fork.pth", "tiny_concat_uvit.pth"):
        torch.testing.assert_close(outputs[name], outputs["tiny_concat.safetensors"])
    torch.testing.assert_close(outputs["tiny_cross_fork.pth"], outputs["tiny_cross.safetensors"])


# --- sampling with KSampler's machinery ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # torchsde, deis: not ours
def test_ksampler_samples_with_every_sampler_and_scheduler(loaded):
    """Every sampler ComfyUI has (normal schedule) and every scheduler with a first- and a second-order
    sampler: 3 steps, CFG batching cond and uncond, 2 latents. (The full product, 378 runs, also passes;
    it takes a minute here for little more coverage of this model.)"""
    from comfy.samplers import KSampler

    model = loaded["tiny_cross.safetensors"]
    positive, negative = conditioning(seed=1), conditioning(seed=2)
    cases = [(s, "normal") for s in KSampler.SAMPLERS] + [(s, k) for s in ("euler", "dpmpp_2m") for k in KSampler.SCHEDULERS]
    failed = []
    for sampler, scheduler in cases:
        out = sample(model, positive, negative, sampler, scheduler, steps=3, batch=2)
        if out.shape != (2, 4, SIDE, SIDE) or not torch.isfinite(out).all():
            failed.append(f"{sampler}/{scheduler}")
    assert len(KSampler.SAMPLERS) >= 40 and len(KSampler.SCHEDULERS) >= 9
    assert not failed, failed


def test_sampling_is_seeded_and_follows_the_text(loaded):
    model = loaded["tiny_concat.safetensors"]
    a = sample(model, conditioning(seed=1), conditioning(seed=2), "dpmpp_2m", "karras", steps=4)
    b = sample(model, conditioning(seed=1), conditioning(seed=2), "dpmpp_2m", "karras", steps=4)
    c = sample(model, conditioning(seed=5), conditioning(seed=2), "dpmpp_2m", "karras", steps=4)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4


def test_fp8_weights_sample(pack, uvit_files):
    model = pack.X2IUViTLoader.execute("tiny_cross.safetensors", "fp8_e4m3fn").result[0]
    assert model.model.diffusion_model.patch_embed.proj.weight.dtype == torch.float8_e4m3fn
    out = sample(model, conditioning(seed=1), conditioning(seed=2))
    assert torch.isfinite(out).all()


# --- conditioning ------------------------------------------------------------------------------------


def test_a_long_prompt_uses_its_first_clip_chunk_with_a_warning(loaded, caplog):
    model = loaded["tiny_concat.safetensors"]
    long = conditioning(tokens=154, seed=1)
    first_chunk = [[long[0][0][:, :77].clone(), {}]]
    with caplog.at_level(logging.WARNING):
        out = sample(model, long, conditioning(seed=2))
    assert "the prompt is 154 tokens long (2 CLIP chunks)" in caplog.text and "only the first 77 are used" in caplog.text
    torch.testing.assert_close(out, sample(model, first_chunk, conditioning(seed=2)))


def test_a_long_negative_is_cut_too(loaded):
    model = loaded["tiny_concat.safetensors"]
    out = sample(model, conditioning(seed=1), conditioning(tokens=231, seed=2))
    long = conditioning(tokens=231, seed=2)
    torch.testing.assert_close(out, sample(model, conditioning(seed=1), [[long[0][0][:, :77].clone(), {}]]))


@pytest.mark.parametrize(("tokens", "width", "message"), [
    (77, 1024, r"conditioning is 1024 wide but this U-ViT takes 768-wide text \(CLIP ViT-L/14 features: Load CLIP with clip_l"),
    (77, 2048, r"2048 wide"),
    (40, 768, r"has 40 tokens but this U-ViT takes exactly 77"),
])
def test_conditioning_of_another_encoder_is_refused(loaded, tokens, width, message):
    with pytest.raises(UViTInputError, match=message):
        sample(loaded["tiny_concat.safetensors"], conditioning(tokens, width), conditioning())


def test_a_latent_of_another_size_is_named(loaded):
    with pytest.raises(UViTInputError, match=r"latent is 16×16 but this U-ViT was trained on 8×8 latents \(64×64 images"):
        sample(loaded["tiny_concat.safetensors"], conditioning(), conditioning(), side=16)


# --- bad files ---------------------------------------------------------------------------------------


def test_loader_validation_names_the_problem(pack, uvit_files):
    validate = pack.X2IUViTLoader.validate_inputs
    assert validate(uvit_name="tiny_cross.safetensors", weight_dtype="default") is True
    assert validate(uvit_name="tiny_concat_fork.pth", weight_dtype="default") is True
    assert "not found in models/diffusion_models" in validate(uvit_name="missing.safetensors", weight_dtype="default")
    assert "a Stable Diffusion U-Net or checkpoint (load it with Load Checkpoint), not a U-ViT" in validate(uvit_name="sd15_unet.safetensors", weight_dtype="default")
    assert "not a readable safetensors file" in validate(uvit_name="broken.safetensors", weight_dtype="default")


def test_another_architecture_is_refused_at_load(pack, uvit_files):
    with pytest.raises(UViTFileError, match="a Stable Diffusion U-Net or checkpoint"):
        pack.X2IUViTLoader.execute("sd15_unet.pth", "default")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        pack.X2IUViTLoader.execute("tiny_cross.safetensors", "fp4")
