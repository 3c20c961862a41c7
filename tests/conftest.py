"""Shared fixtures: tiny real-architecture encoders and official-format GlueNet files, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from x2i_testing import (
    make_t5_encoder_folder,
    make_xlm_roberta_folder,
    random_state_dict,
    translator_noln_layout,
)

TINY_XLMR_HIDDEN = 64


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
def tiny_clap(tmp_path_factory) -> Path:
    from x2i_testing import make_clap_folder

    return make_clap_folder(tmp_path_factory.mktemp("encoders") / "clap-tiny")
