"""Shared fixtures: tiny real-architecture encoders and official-format GlueNet files, built once; the
device switch (``--device``, ``--comfy-vram``) that moves the faithfulness and node tests onto a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import support  # noqa: F401  (first: imports this repository as the package x2i)
from support.models import make_t5_encoder_folder, make_xlm_roberta_folder, random_state_dict, translator_noln_layout

TINY_XLMR_HIDDEN = 64

DEVICES = ("cpu", "cuda")
COMFY_VRAM_MODES = ("normal", "lowvram", "novram")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("x2i", "ComfyUI-X2I device switch")
    group.addoption(
        "--device", choices=DEVICES, default=os.environ.get("X2I_TEST_DEVICE", "cpu"),
        help="where tests marked 'device' run the pack's models, and where in-process ComfyUI and the test "
        "server put them (default cpu; env X2I_TEST_DEVICE)")
    group.addoption(
        "--comfy-vram", choices=COMFY_VRAM_MODES, default=os.environ.get("X2I_COMFY_VRAM", "normal"),
        help="ComfyUI's memory mode with --device cuda: normal, lowvram (--lowvram) or novram (--novram) "
        "(default normal; env X2I_COMFY_VRAM)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: runs the pack's models on the --device of your choice (default cpu)")
    device, vram = config.getoption("--device"), config.getoption("--comfy-vram")
    if device not in DEVICES:  # an environment variable bypasses argparse's choices
        raise pytest.UsageError(f"--device / X2I_TEST_DEVICE must be one of {', '.join(DEVICES)}, got {device!r}")
    if vram not in COMFY_VRAM_MODES:
        raise pytest.UsageError(f"--comfy-vram / X2I_COMFY_VRAM must be one of {', '.join(COMFY_VRAM_MODES)}, got {vram!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--device cuda was asked for, but this torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda={torch.version.cuda}); run on a machine with an NVIDIA GPU and a CUDA build of torch, "
            "or drop --device / X2I_TEST_DEVICE to test on the CPU")
    if device == "cpu" and vram != "normal":
        raise pytest.UsageError(f"--comfy-vram {vram} needs --device cuda: on the CPU ComfyUI has no VRAM to save")


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device of the --device switch. On CUDA, float32 stays float32 (no TF32 in matmuls or cuDNN
    convolutions), so a float32 test holds the same tolerance as on the CPU; the reduced precision users
    get is tested separately, against float32, with its own stated tolerance."""
    chosen = torch.device(pytestconfig.getoption("--device"))
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return chosen


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine two spinning threads per process run several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory) -> Path:
    """A tiny XLM-Roberta folder (hidden 64) written with save_pretrained."""
    return make_xlm_roberta_folder(tmp_path_factory.mktemp("encoders") / "xlm-roberta-tiny", hidden=TINY_XLMR_HIDDEN)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return make_t5_encoder_folder(tmp_path_factory.mktemp("encoders") / "t5-tiny")


@pytest.fixture(scope="session")
def small_text_gluenet_state() -> dict[str, torch.Tensor]:
    """Official Translator_noln keys for a 64-wide encoder: 77 tokens, 64 -> 768, depth 2."""
    return random_state_dict(translator_noln_layout(77, TINY_XLMR_HIDDEN, 768, depth=2), seed=1)


@pytest.fixture(scope="session")
def small_text_gluenet_ckpt(tmp_path_factory, small_text_gluenet_state) -> Path:
    """Written like the released files: torch.save(state_dict) under the released naming scheme."""
    path = tmp_path_factory.mktemp("gluenet") / "gluenet_French_clip_overnorm_over3_noln.ckpt"
    torch.save(small_text_gluenet_state, path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama folder (hidden 32, its sentencepiece tokenizer) written with save_pretrained."""
    from support.models import make_llama_folder

    return make_llama_folder(tmp_path_factory.mktemp("encoders") / "llama-tiny")


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory) -> Path:
    from support.models import make_clap_folder

    return make_clap_folder(tmp_path_factory.mktemp("encoders") / "clap-tiny")
