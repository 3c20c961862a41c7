"""Fixtures for integration tests that run the pack inside a real ComfyUI server.

Needs a ComfyUI checkout named by ``COMFYUI_PATH`` (with its requirements
installed in this Python); without it every test here is skipped. The pytest
process itself never imports ``comfy``: the checkpoint is built and the server
runs in subprocesses.

Session fixtures, in dependency order:

* ``comfyui_path``      -> Path of the ComfyUI checkout.
* ``sd15_checkpoint``   -> Path of a cached random-weight SD1.5 checkpoint.
* ``sdxl_checkpoint``   -> Path of a cached random-weight SDXL-family checkpoint (no text encoders).
* ``comfy_models_dir``  -> Path of a temp models root (checkpoints/, text_encoders/,
  gluenet/, ...); request fixtures that add files to it *before* ``comfy_server``.
* ``comfy_server``      -> a running ``ComfyServer`` (see tests/support/comfy_server.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, T5EncoderModel

from support.comfy_server import MODEL_FOLDERS, PACK_NAME, ComfyServer, ServerLayout, start_server
from support.models import (
    audioclip_full_checkpoint,
    fake_ulip_checkpoint,
    make_llama_folder,
    make_t5_encoder_folder,
    make_xlm_roberta_folder,
    official_layout,
    random_state_dict,
    write_clip_from_checkpoint,
    write_lavibridge_folder,
    write_pixart_checkpoint,
    write_pixart_lora_vis,
    write_vae_from_checkpoint,
)
from support.sample_inputs import BARK_FILE, CHAIR_FILE, write_wav
from support.sd15_checkpoint import RECIPE_VERSION, cached_checkpoint
from support.sdxl_checkpoint import RECIPE_VERSION as SDXL_RECIPE_VERSION
from support.workflow_models import (
    CLIP_FILE,
    PIXART_TEST_DEPTH,
    SD_IN_WRONG_FOLDER,
    SDXL_CHECKPOINT,
    SECOND_LORA,
    SECOND_LORA_KEY,
    TINY_UVIT,
    UVIT_FILE,
    VAE_FILE,
)
from x2i.gluenet import GlueNetConfig, save_gluenet
from x2i.gluenet.modules import GlueNet
from x2i.uvit import UViT, save_uvit

HERE = Path(__file__).resolve().parent
SD15_CHECKPOINT_SCRIPT = HERE.parent / "support" / "sd15_checkpoint.py"
SDXL_CHECKPOINT_SCRIPT = HERE.parent / "support" / "sdxl_checkpoint.py"

REPO_ROOT = HERE.parents[1]
SKIP_REASON = "COMFYUI_PATH is not set: integration tests need a ComfyUI checkout (see README)"
CHECKPOINT_NAME = "sd15_random.safetensors"
# The name example workflows use, so they run unmodified.
CHECKPOINT_ALIAS = "v1-5-pruned-emaonly.safetensors"


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too so --strict-markers holds whatever pyproject.toml declares.
    config.addinivalue_line("markers", "integration: starts a real ComfyUI server (needs COMFYUI_PATH)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything in this directory `integration`; skip (not error) it without ComfyUI.

    This hook sees the items of the whole session, hence the directory filter.
    """
    ours = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    for item in ours:
        item.add_marker(pytest.mark.integration)
    if not os.environ.get("COMFYUI_PATH"):
        skip = pytest.mark.skip(reason=SKIP_REASON)
        for item in ours:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={path} has no main.py; point it at a ComfyUI checkout")
    return path


def _cached_checkpoint(script: Path, name: str, recipe_version: str, comfyui_path: Path) -> Path:
    """``$X2I_TEST_CACHE/name`` (default ``~/.cache/x2i-tests``), built by ``script`` in a subprocess unless the
    cached file was made by ``recipe_version``; a failed build fails the test."""
    try:
        return cached_checkpoint(script, name, recipe_version, comfyui_path)
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def sd15_checkpoint(comfyui_path: Path) -> Path:
    """A random-weight SD1.5 single-file checkpoint (~2.1 GB fp16), built once and cached.

    Built by ``tests/support/sd15_checkpoint.py`` in a subprocess, which also checks that
    ``comfy.sd.load_checkpoint_guess_config`` loads it as SD1.5.
    """
    return _cached_checkpoint(SD15_CHECKPOINT_SCRIPT, CHECKPOINT_NAME, RECIPE_VERSION, comfyui_path)


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfyui_path: Path) -> Path:
    """A random-weight SDXL-family single-file checkpoint (~1.8 GB fp16: U-Net and VAE, no text encoders),
    built once and cached as ``sdxl_random.safetensors`` (``SDXL_CHECKPOINT``).

    Built by ``tests/support/sdxl_checkpoint.py`` in a subprocess, which also checks that
    ``comfy.sd.load_checkpoint_guess_config`` loads it as SDXL (Segmind Vega's depths), with a VAE and no CLIP.
    Workflows that use it encode their prompts with the pack's encoders (ComfyUI builds no CLIP from it).
    """
    return _cached_checkpoint(SDXL_CHECKPOINT_SCRIPT, SDXL_CHECKPOINT, SDXL_RECIPE_VERSION, comfyui_path)


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link keeps the name a regular file; fall back to a symlink across filesystems.
    try:
        os.link(source, target)
    except OSError:
        target.symlink_to(source)


@pytest.fixture(scope="session")
def comfy_models_dir(tmp_path_factory: pytest.TempPathFactory, sd15_checkpoint: Path) -> Path:
    """Models root the server reads: every MODEL_FOLDERS entry exists; the SD1.5 checkpoint
    is ``checkpoints/v1-5-pruned-emaonly.safetensors``."""
    models = tmp_path_factory.mktemp("models")
    for folder in MODEL_FOLDERS:
        (models / folder).mkdir()
    _link_or_copy(sd15_checkpoint, models / "checkpoints" / CHECKPOINT_ALIAS)
    return models


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, comfyui_path: Path,
                 comfy_models_dir: Path, pytestconfig: pytest.Config) -> Iterator[ComfyServer]:
    """A ComfyUI server with this repo loaded as custom node pack ``ComfyUI-X2I``, in the memory mode of
    the device switch (``--device cpu``: ``--cpu``; ``--device cuda``: GPU, with ``--lowvram`` /
    ``--novram`` for ``--comfy-vram lowvram`` / ``novram``).

    Everything it writes (output, input, temp, user dir, log) lives in a temp
    dir; its database is in memory. Files added to ``comfy_models_dir`` later
    are still found: ComfyUI rescans a folder when its mtime changes.
    """
    layout = ServerLayout(tmp_path_factory.mktemp("comfy"))
    layout.create(REPO_ROOT, PACK_NAME, comfy_models_dir)
    try:
        server = start_server(comfyui_path, layout, comfy_models_dir,
                              pytestconfig.getoption("--device"), pytestconfig.getoption("--comfy-vram"))
    except Exception as exc:  # noqa: BLE001 - report any start failure as a test failure
        pytest.fail(f"ComfyUI did not start: {exc}", pytrace=False)
    yield server
    server.stop()


LANGUAGES = ("Chinese", "French", "Italian", "Japanese", "Spanish")
T5_HIDDEN = 48


@pytest.fixture(scope="session")
def gluegen_models(comfy_models_dir: Path) -> Path:
    """The files the shipped workflows name, as tiny real-architecture stand-ins.

    The multilingual GlueNets are full-size released-format checkpoints (77x1024 -> 768), so the
    stand-in XLM-R is 1024 wide (one layer) like xlm-roberta-large.
    """
    encoders = comfy_models_dir / "text_encoders"
    make_xlm_roberta_folder(encoders / "xlm-roberta-large", hidden=1024, layers=1, heads=8)
    make_t5_encoder_folder(encoders / "t5-v1_1-large", d_model=T5_HIDDEN)
    gluenets = comfy_models_dir / "gluenet"
    released = gluenets / "gluenet_French_clip_overnorm_over3_noln.ckpt"
    torch.save(random_state_dict(official_layout("Translator_noln(77,1024,768,2,5)"), seed=7), released)
    for language in LANGUAGES:
        target = gluenets / f"gluenet_{language}_clip_overnorm_over3_noln.ckpt"
        if not target.exists():
            os.link(released, target)
    config = GlueNetConfig("translator_noln", num_tokens=77, in_dim=T5_HIDDEN, out_dim=768, depth=2, encoder_hint="t5-v1_1-large")
    torch.manual_seed(0)
    save_gluenet(GlueNet(config), gluenets / "gluenet_t5-v1_1-large_sd15.safetensors")
    # A LoRA sitting in the wrong folder: a valid safetensors file that is not a GlueNet.
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 2)}, str(gluenets / "not_a_gluenet.safetensors"))
    return comfy_models_dir


# The checkpoint name the SDXL workflows use, so they run unmodified.
SDXL_CHECKPOINT_ALIAS = "sd_xl_base_1.0.safetensors"


def sdxl_gluenet(path: Path, architecture: str, num_tokens: int, in_dim: int, seed: int, **extra) -> None:
    """A GlueNet for SDXL in this pack's format (nobody released one): 77 x 2048 tokens and the 1280-wide pooled
    vector, with per-token norms of the size SDXL's targets have."""
    config = GlueNetConfig(architecture, num_tokens=num_tokens, in_dim=in_dim, out_dim=2048, depth=extra.pop("depth", 2),
                           target="sdxl", pooled_dim=1280, output_norm=(60.0,) + (30.0,) * 76, pooled_norm=2.0, **extra)
    torch.manual_seed(seed)
    save_gluenet(GlueNet(config), path)


@pytest.fixture(scope="session")
def sdxl_models(comfy_models_dir: Path, sdxl_checkpoint: Path, gluegen_models: Path, multimodal_models: Path) -> Path:
    """What the SDXL GlueGen workflows name: the random SDXL-family checkpoint as ``sd_xl_base_1.0.safetensors``,
    French and Chinese GlueNets for the 1024-wide stand-in XLM-R, a sound GlueNet for AudioCLIP's 1024 (16 x 64)."""
    _link_or_copy(sdxl_checkpoint, comfy_models_dir / "checkpoints" / SDXL_CHECKPOINT_ALIAS)
    gluenets = comfy_models_dir / "gluenet"
    for seed, (language, code) in enumerate((("Chinese", "zh"), ("French", "fr"))):
        sdxl_gluenet(gluenets / f"gluenet_{language}_xlmr_sdxl.safetensors", "translator_noln", 77, 1024, seed,
                     input_divisor=3.0, language=code)
    sdxl_gluenet(gluenets / "gluenet_sound_us8k_sdxl.safetensors", "translator_w_head", 16, 64, 5, depth=3, num_tokens_out=77, mult=2)
    return comfy_models_dir


@pytest.fixture(scope="session")
def sdxl_bridge_models(sdxl_models: Path, lavibridge_t5_models: Path) -> Path:
    """What lavibridge_t5_sdxl.json names besides the checkpoint and ``t5-large``: a bridge file of this pack trained
    for SDXL (nobody released one) whose vision LoRA fits the test checkpoint's U-Net as ComfyUI detects it."""
    from support.sdxl_checkpoint import SDXL_UNET
    from x2i.bridge.adapter import TextAdapter, TextAdapterConfig
    from x2i.bridge.lora import UNetStructure, text_lora_targets, unet_lora_targets
    from x2i.bridge.trained import save_trained_bridge

    t5 = T5EncoderModel.from_pretrained(sdxl_models / "text_encoders" / "t5-large")
    generator = torch.Generator().manual_seed(3)

    def pairs(targets) -> dict:
        return {t.name: tuple(torch.randn(shape, generator=generator) * 0.01 for shape in t.pair_shapes(4)) for t in targets}

    torch.manual_seed(3)
    adapter = TextAdapter(TextAdapterConfig(t5.config.d_model, 64, 2048, pooled_dim=1280))
    save_trained_bridge(sdxl_models / "lavi_bridge" / "t5_sdxl.safetensors", recipe="t5_unet", diffusion_model="sdxl",
                        adapter=adapter, vision_lora=pairs(unet_lora_targets(UNetStructure.from_comfy_config(SDXL_UNET))),
                        text_lora=pairs(text_lora_targets(t5, "t5")), context_dim=2048, language_model="t5-large")
    return sdxl_models


@pytest.fixture(scope="session")
def multimodal_models(comfy_models_dir: Path) -> Path:
    audio_encoders = comfy_models_dir / "audio_encoders"
    audioclip_full_checkpoint(audio_encoders / "AudioCLIP-Full-Training.pt")
    gluenets = comfy_models_dir / "gluenet"
    torch.save(random_state_dict(official_layout("Translator_w_head(16,77,64,768,4,5)"), seed=11),
               gluenets / "gluenet_sound2img_audioclip_us8k.ckpt")
    checkpoint, _ = fake_ulip_checkpoint("ulip1", seed=2)
    torch.save(checkpoint, comfy_models_dir / "point_encoders" / "pointbert_ULIP-1.pt")
    # No point-cloud GlueNet was released: a trainer-made one for ULIP-1's 512-d embedding (16 x 32).
    config = GlueNetConfig("translator_w_head", num_tokens=16, num_tokens_out=77, in_dim=32, out_dim=768, mult=2, depth=3)
    torch.manual_seed(0)
    save_gluenet(GlueNet(config), gluenets / "gluenet_pointbert_ulip1_sd15.safetensors")
    return comfy_models_dir


@pytest.fixture(scope="session")
def multimodal_inputs(comfy_server: ComfyServer) -> Path:
    """The server's input folder, holding the sound and point cloud the shipped workflows name: the samples the
    pack copied there itself when it loaded (workflows/inputs/)."""
    inputs = comfy_server.input_dir
    for name in (BARK_FILE, CHAIR_FILE):
        shipped = REPO_ROOT / "workflows" / "inputs" / name
        assert (inputs / name).read_bytes() == shipped.read_bytes(), f"the pack did not copy its sample {name}"
    return inputs


@pytest.fixture(scope="session")
def varied_sounds(multimodal_inputs: Path) -> list[str]:
    """Five WAV files of different pitch in the server's input folder (prompts that must not hit the cache)."""
    return [write_wav(multimodal_inputs / f"varied_{k}.wav", pitch=500.0 + 40 * k).name for k in range(5)]


@pytest.fixture(scope="session")
def lavibridge_t5_models(comfy_models_dir: Path) -> Path:
    """What lavibridge_t5_sd15.json names besides the checkpoint: a tiny T5 as ``t5-large`` and a released-
    format ``t5_unet`` bridge (the Llama bridge and a second LoRA come with ``lavibridge_models``)."""
    t5_folder = make_t5_encoder_folder(comfy_models_dir / "text_encoders" / "t5-large")
    (comfy_models_dir / "lavi_bridge").mkdir(exist_ok=True)
    t5 = T5EncoderModel.from_pretrained(t5_folder)
    write_lavibridge_folder(comfy_models_dir / "lavi_bridge" / "t5_unet", t5, "t5", adapter_in=t5.config.d_model)
    return comfy_models_dir


@pytest.fixture(scope="session")
def lavibridge_models(lavibridge_t5_models: Path) -> Path:
    """lavibridge_t5_models (conftest) plus the Llama-2 bridge and a second, ordinary LoRA."""
    comfy_models_dir = lavibridge_t5_models
    llama_folder = make_llama_folder(comfy_models_dir / "text_encoders" / "Llama-2-7b-hf")
    llama = AutoModel.from_pretrained(llama_folder)
    write_lavibridge_folder(comfy_models_dir / "lavi_bridge" / "llama2_unet", llama, "llama", adapter_in=llama.config.hidden_size, seed=1)
    save_file(
        {f"{SECOND_LORA_KEY}.lora_up.weight": torch.randn(320, 4) * 0.01,
         f"{SECOND_LORA_KEY}.lora_down.weight": torch.randn(4, 768) * 0.01,
         f"{SECOND_LORA_KEY}.alpha": torch.tensor(4.0)},
        str(comfy_models_dir / "loras" / SECOND_LORA),
    )
    return comfy_models_dir


@pytest.fixture(scope="session")
def pixart_models(lavibridge_models: Path, sd15_checkpoint: Path) -> Path:
    """The files lavibridge_t5_pixart.json names: the PixArt transformer, the SD VAE, the t5_transformer bridge."""
    write_pixart_checkpoint(lavibridge_models / "diffusion_models" / "PixArt-XL-2-512x512.safetensors", depth=PIXART_TEST_DEPTH)
    write_vae_from_checkpoint(sd15_checkpoint, lavibridge_models / "vae" / "vae-ft-ema-560000-ema-pruned.safetensors")
    t5 = T5EncoderModel.from_pretrained(lavibridge_models / "text_encoders" / "t5-large")
    folder = write_lavibridge_folder(lavibridge_models / "lavi_bridge" / "t5_transformer", t5, "t5", adapter_in=t5.config.d_model,
                                     seed=2, pixart=True)
    write_pixart_lora_vis(folder, depth=PIXART_TEST_DEPTH, seed=2)
    return lavibridge_models


@pytest.fixture(scope="session")
def uvit_models(comfy_models_dir: Path, sd15_checkpoint: Path) -> Path:
    torch.manual_seed(0)
    save_uvit(UViT(TINY_UVIT), comfy_models_dir / "diffusion_models" / UVIT_FILE)
    write_clip_from_checkpoint(sd15_checkpoint, comfy_models_dir / "text_encoders" / CLIP_FILE)
    write_vae_from_checkpoint(sd15_checkpoint, comfy_models_dir / "vae" / VAE_FILE)
    wrong = comfy_models_dir / "diffusion_models" / SD_IN_WRONG_FOLDER
    if not wrong.exists():
        os.link(sd15_checkpoint, wrong)  # a whole SD checkpoint where a U-ViT is expected
    return comfy_models_dir
