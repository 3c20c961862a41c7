"""Regenerate ``audioclip_golden.safetensors`` and ``audioclip_official_layout.json`` with the official AudioCLIP code.

The recipe is the one ``audioclip_README.md`` documents: the official ``ESResNeXtFBSP`` built with the
keyword arguments ``AudioCLIP()`` uses and ``AudioCLIP(pretrained=False)``, seeded full-size weights
(``support.models.seeded_audio_weights``), BatchNorm statistics calibrated by one train-mode pass,
inputs from ``seeded_clips`` of ``tests/encoders/test_audioclip.py``. Run outside CI, against a checkout
of AndreyGuzhov/AudioCLIP at the commit below (imported, never copied; its Git-LFS assets are not needed):

    python tests/data/make_audioclip_golden.py --official /path/to/AudioCLIP [--out DIR] [--check]

Needs torch, torchvision, numpy, scipy (the window), regex, Pillow, tqdm, safetensors. Packages only the
official dataset/training code imports (librosa, soundfile, pandas, sklearn, visdom, ftfy, pytorch-ignite,
termcolor) are replaced by empty stub modules when they are not installed, and the text tokenizer, which
the official ``model/clip/clip.py`` builds at import, reads a dummy BPE vocabulary (the checkout's is an
LFS pointer). Takes about a minute on 2 CPU cores (float64 forwards of the full network).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_tools  # noqa: E402

REPO, COMMIT = "AndreyGuzhov/AudioCLIP", "45327aa203839bfeb58681dd36c04fd493ee72f4"
# ESResNeXtFBSP's arguments as AudioCLIP.__init__ passes them (its defaults; num_classes = embed_dim).
AUDIOCLIP_KWARGS = dict(n_fft=2048, hop_length=561, win_length=1654, window="blackmanharris", normalized=True,
                        onesided=True, spec_height=-1, spec_width=-1, num_classes=1024, apply_attention=True,
                        pretrained=False)
SEEDS = {"weights": 0, "calibration": 100, "spectrogram": 200, "forward": 300}
FILTER_ROWS = [0, 1, 341, 682, 1022, 1024]
SPECTROGRAM_SAMPLES = 4000
STUBBED = ["librosa", "soundfile", "pandas", "sklearn", "sklearn.model_selection", "visdom", "ftfy",
           "ignite", "ignite.engine", "ignite.metrics", "ignite.handlers", "termcolor"]


class _StubModule(types.ModuleType):
    """An empty module whose every attribute is a placeholder class (enough for import-time use)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def stub_missing_packages() -> list[str]:
    stubbed = []
    for name in STUBBED:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            module = _StubModule(name)
            module.__path__ = []  # a package, so that its submodules import
            sys.modules[name] = module
            parent, _, leaf = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], leaf, module)
            stubbed.append(name)
    return stubbed


def import_official(checkout: Path, workdir: Path):
    """The official ``model`` package, with the tokenizer built from a dummy (header-only) BPE file."""
    golden_tools.use_official(checkout)
    stubbed = stub_missing_packages()
    if stubbed:
        golden_tools.say(f"stub modules for: {', '.join(stubbed)}")
    dummy_bpe = workdir / "dummy_bpe.txt.gz"
    with gzip.open(dummy_bpe, "wt") as handle:
        handle.write("#version: dummy\n")
    from utils import simple_tokenizer  # noqa: I001  (official; must come before model.clip)

    simple_tokenizer.SimpleTokenizer.__init__.__defaults__ = (str(dummy_bpe),)
    import model  # noqa: F401  (official: model.clip, model.esresnet, model.audioclip)
    from model.audioclip import AudioCLIP
    from model.esresnet import ESResNeXtFBSP

    return ESResNeXtFBSP, AudioCLIP


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def layout_file(ESResNeXtFBSP, AudioCLIP, path: Path) -> dict[str, list[int]]:
    audio = ESResNeXtFBSP(**AUDIOCLIP_KWARGS)
    audio_keys = {k: list(v.shape) for k, v in audio.state_dict().items()}
    full = AudioCLIP(pretrained=False).state_dict()
    data = {
        "source": f"{REPO}@{COMMIT} model/esresnet/fbsp.py ESResNeXtFBSP(**AudioCLIP kwargs) and "
                  "model/audioclip.py AudioCLIP(pretrained=False)",
        "audioclip_kwargs": AUDIOCLIP_KWARGS,
        "num_tensors": len(audio_keys),
        "num_parameters": sum(p.numel() for p in audio.parameters()),
        "num_values": sum(v.numel() for v in audio.state_dict().values()),
        "audio_keys": audio_keys,
        "full_checkpoint_num_tensors": len(full),
        "full_checkpoint_audio_keys": [k for k in full if k.startswith("audio.")],
        "full_checkpoint_other_keys": {k: list(v.shape) for k, v in full.items() if not k.startswith("audio.")},
    }
    golden_tools.write_json(path, data)
    return audio_keys


def main(argv: list[str] | None = None) -> None:
    args = golden_tools.parse_args(__doc__.splitlines()[0], REPO, COMMIT, argv)
    golden_tools.use_tests_package()
    from support.models import seeded_audio_weights

    seeded_clips = golden_tools.load_test_module("encoders/test_audioclip.py").seeded_clips

    with tempfile.TemporaryDirectory() as workdir:
        ESResNeXtFBSP, AudioCLIP = import_official(args.official, Path(workdir))
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    layout_path = args.stage / "audioclip_official_layout.json"
    layout = layout_file(ESResNeXtFBSP, AudioCLIP, layout_path)

    # Seeded weights with the official window; BatchNorm statistics from one train-mode pass.
    network = ESResNeXtFBSP(**AUDIOCLIP_KWARGS)
    state = seeded_audio_weights(layout, SEEDS["weights"])
    state["window"] = network.window.detach().clone()
    network.load_state_dict(state, strict=True)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: the statistics of this pass exactly
    network.train()
    with torch.no_grad():
        network(seeded_clips(3, SEEDS["calibration"]))
    calibrated = network.state_dict()
    statistics = {k: calibrated[k].detach().clone() for k in state if k.endswith(("running_mean", "running_var"))}
    state.update(statistics)  # num_batches_tracked stays 0
    network = ESResNeXtFBSP(**AUDIOCLIP_KWARGS)
    network.load_state_dict(state, strict=True)
    network.eval()

    tensors = {"weights.window": state["window"]}
    tensors.update({f"weights.{k}": v for k, v in statistics.items()})
    with torch.no_grad():
        weights, _ = network.fbsp._materialize_weights(torch.zeros(1, AUDIOCLIP_KWARGS["n_fft"]))
        tensors["filters.rows"] = torch.tensor(FILTER_ROWS)
        tensors["filters.values"] = weights[FILTER_ROWS].contiguous()

        short = seeded_clips(1, SEEDS["spectrogram"], samples=SPECTROGRAM_SAMPLES)
        tensors["spectrogram.input"] = short
        tensors["spectrogram.decibels"] = network._forward_pre_processing(short)

        clips = seeded_clips(2, SEEDS["forward"])
        tensors["forward.input_probe"] = clips[:, :, :64].reshape(-1).contiguous()
        tensors["forward.embedding"] = network(clips)

        clip_model = AudioCLIP(pretrained=False)
        clip_model.audio.load_state_dict(state, strict=True)
        clip_model.eval()
        ((z, _, _), _), _ = clip_model(audio=clips)
        tensors["forward.normalized"] = z

        # Float64: the official forward casts its input to the default dtype.
        network64 = network.double()
        with default_dtype(torch.float64), threads(1):
            tensors["spectrogram.decibels_fp64"] = network64._forward_pre_processing(short.double())
            tensors["float64.embedding"] = network64(short.double())
            clip_model.double()
            ((z64, _, _), _), _ = clip_model(audio=clips.double())
            tensors["forward.normalized_fp64"] = z64

    spec_error = (tensors["spectrogram.decibels"].double() - tensors["spectrogram.decibels_fp64"]).abs().max().item()
    embed_error = (tensors["forward.normalized"].double() - tensors["forward.normalized_fp64"]).abs().max().item()
    golden_tools.say(f"float32 vs float64: spectrogram {spec_error:.6g} dB, unit embedding {embed_error:.6g}")
    metadata = {
        "source": f"{REPO}@{COMMIT} (model/esresnet/*.py, model/audioclip.py), run on CPU with torch {torch.__version__}",
        "seeds": json.dumps(SEEDS),
        "spectrogram_fp32_vs_fp64": f"{spec_error:.6g}",
        "official_fp32_vs_fp64": f"{embed_error:.6g}",
    }
    golden = args.stage / "audioclip_golden.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(golden), metadata=metadata)
    golden_tools.finish(args, [golden, layout_path])


if __name__ == "__main__":
    main()
