"""Sound and point-cloud GlueNets trained end to end on generated data (tones per class in the
UrbanSound8K layout through CLAP; shapes with captions through a ULIP PointBERT), and the cached
features equal to what the nodes' encoders compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.models import audioclip_full_checkpoint, make_clap_folder
from support.training import (
    SHAPE_CAPTIONS,
    write_point_cloud_folder,
    write_sd1_checkpoint,
    write_small_ulip_checkpoint,
    write_urbansound8k,
)
from x2i.gluenet import load_gluenet
from x2i.training import Distributed, RunSettings, section, train
from x2i.training.gluenet_task import GlueNetTask

# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gluenet_modalities")
    write_sd1_checkpoint(root / "sd15.safetensors", hidden=32)
    from support.training import make_clip_tokenizer

    make_clip_tokenizer(root / "sd1_tokenizer")
    return root


def base_config(root: Path, output: str, modality: str) -> dict:
    return {
        "run": {"output_dir": str(root / output), "log_every": 2, "checkpoint_every": 1000, "precision": "fp32", "device": "cpu"},
        "data": {"modality": modality},
        "target": {"clip": str(root / "sd15.safetensors"), "tokenizer": str(root / "sd1_tokenizer")},
        "model": {"out_dim": 32, "depth": 3},
        "optim": {"lr": 1e-3, "lr_step_epochs": 1000},
    }


def run(raw: dict):
    task = GlueNetTask.from_config(raw)
    result = train(task, section(raw, "run", RunSettings), dist=Distributed())
    lines = (Path(raw["run"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return task, result, [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "val"]


def test_sound_gluenet_on_urbansound8k_layout_learns_the_classes(shared: Path):
    data = write_urbansound8k(shared / "us8k", clips_per_fold=2, folds=3)  # 4 classes, fold 1 held out
    clap = make_clap_folder(shared / "clap-tiny", projection_dim=32)
    raw = base_config(shared, "sound", "audio")
    raw["run"].update(epochs=35, batch_size=4)
    # One prompt per class ("a vivid photo of dog is barking", ...): with a character-level toy CLIP the
    # official per-visit draw among 6 templates x synonyms moves the class words to other token
    # positions, and the averaged target would take far longer than a test to learn.
    raw["data"].update(audio_dir=str(data), train_folds=[2, 3], val_folds=[1], prompt_choice="first")
    raw["source"] = {"encoder": str(clap)}
    raw["model"]["token_width"] = 8  # CLAP's 32-d embedding as 4 tokens of 8
    task, result, train_log, val_log = run(raw)
    described = task.describe()
    assert described["train_samples_usable"] == 16 and described["val_samples_used"] == 8 and described["classes"] == 4
    assert described["gluenet"] == "translator_w_head 4x8 -> 77x32, mult 4, depth 3"
    assert train_log[-1]["mse"] < 0.5 * train_log[0]["mse"]
    # Retrieval among the 4 class targets (the mean of each class's prompts): chance is 1/4.
    assert val_log[-1]["retrieval_chance"] == pytest.approx(0.25)
    assert val_log[-1]["retrieval_top1"] >= 0.75 and val_log[-1]["cosine"] > val_log[0]["cosine"]
    gluenet = load_gluenet(result.exported[0])
    assert (gluenet.config.architecture, gluenet.config.input_divisor, gluenet.config.encoder_hint) == ("translator_w_head", 1.0, "clap-tiny")


def test_each_epoch_draws_one_of_a_class_prompts_deterministically():
    from x2i.training.gluenet_task import GlueNetTrainingSet

    sources, targets = torch.arange(3.0)[:, None], torch.arange(10.0)[:, None]
    samples = [(0, (0, 1, 2, 3)), (1, (4, 5, 6, 7)), (2, (8,))]
    dataset = GlueNetTrainingSet(sources, targets, samples, indices=[0, 1, 2], seed=0)
    seen = {0: set(), 1: set()}
    picks = []
    for epoch in range(40):
        dataset.set_epoch(epoch)
        picks.append([int(dataset[i]["target"]) for i in range(3)])
        seen[0].add(picks[-1][0])
        seen[1].add(picks[-1][1])
    assert seen == {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}} and {p[2] for p in picks} == {8}
    # A pure function of (seed, sample, epoch): a resumed run, or any rank, draws the same.
    again = GlueNetTrainingSet(sources, targets, samples, indices=[0, 1, 2], seed=0)
    again.set_epoch(17)
    assert [int(again[i]["target"]) for i in range(3)] == picks[17]


def test_point_cloud_gluenet_learns_captions_of_shapes(shared: Path):
    clouds = write_point_cloud_folder(shared / "clouds", per_shape=4)  # 16 clouds, 4 captions
    ulip = write_small_ulip_checkpoint(shared / "ulip_small.pt")
    (clouds / "broken.npy").write_bytes(b"not a numpy file")
    (clouds / "broken.txt").write_text("a broken cloud\n", encoding="utf-8")
    raw = base_config(shared, "points", "point_cloud")
    raw["run"].update(epochs=40, batch_size=4)
    raw["data"].update(point_cloud_dir=str(clouds), val_fraction=0.25)
    raw["source"] = {"encoder": str(ulip)}
    # A random PointBERT's unit embeddings of these shapes differ by ~0.007 per value: scaled up x10
    # (input_divisor 0.1) so that a short run separates them.
    raw["model"]["input_divisor"] = 0.1
    task, result, train_log, val_log = run(raw)
    described = task.describe()
    assert described["skipped_unreadable_point_cloud"] == 1  # counted, never trained on
    assert (described["train_samples_usable"], described["val_samples_used"]) == (12, 4)
    assert train_log[-1]["mse"] < 0.5 * train_log[0]["mse"]
    assert val_log[-1]["retrieval_chance"] >= 1 / len(SHAPE_CAPTIONS)  # among the distinct held-out captions
    assert val_log[-1]["retrieval_top1"] >= 0.75
    gluenet = load_gluenet(result.exported[0])
    assert (gluenet.config.num_tokens, gluenet.config.in_dim, gluenet.config.tokens_out, gluenet.config.input_divisor) == (4, 64, 77, 0.1)


def test_cached_sound_features_are_what_the_audioclip_node_computes(tmp_path: Path):
    from x2i.encoders import load_audioclip_audio
    from x2i.training.gluenet_data import AudioClip
    from x2i.training.gluenet_sources import audio_encode_fn, read_audio_file

    audioclip_full_checkpoint(tmp_path / "AudioCLIP-Full-Training.pt")
    encoder = load_audioclip_audio(tmp_path / "AudioCLIP-Full-Training.pt")
    import soundfile

    from support.training import synth_clip

    soundfile.write(str(tmp_path / "a.wav"), synth_clip(440.0, 0, rate=22050, seconds=0.3), 22050)
    soundfile.write(str(tmp_path / "b.flac"), synth_clip(1000.0, 1, rate=48000, seconds=0.2), 48000)
    clips = [AudioClip(tmp_path / "a.wav", "x"), AudioClip(tmp_path / "b.flac", "y")]
    features, errors = audio_encode_fn(encoder)(clips)
    assert errors == [None, None]
    for clip, row in zip(clips, features, strict=True):  # one by one, as X2I GlueGen Audio Encode does
        waveform, rate = read_audio_file(clip.path)
        torch.testing.assert_close(row, encoder.encode_audio(waveform, rate)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["audioclip", "clap"])
def test_a_long_sound_file_is_decoded_only_as_far_as_the_encoder_looks(tmp_path: Path, tiny_clap: Path, kind: str):
    import math
    import tracemalloc

    import soundfile

    from support.training import synth_clip
    from x2i.encoders import load_audioclip_audio, load_clap_audio
    from x2i.training.gluenet_data import AudioClip
    from x2i.training.gluenet_sources import audio_encode_fn, audio_frames_needed, read_audio_file

    if kind == "audioclip":
        audioclip_full_checkpoint(tmp_path / "AudioCLIP-Full-Training.pt")
        encoder = load_audioclip_audio(tmp_path / "AudioCLIP-Full-Training.pt")
    else:
        encoder = load_clap_audio(tiny_clap)
    rate = 16000
    # AudioCLIP: 4 s at 44.1 kHz and the resampler's margin (to_gluegen_waveform); CLAP: its 10 s.
    needed = math.ceil(176400 * rate / 44100) + rate // 10 + 1024 if kind == "audioclip" else 10 * rate
    assert audio_frames_needed(encoder, rate) == needed
    three_minutes = synth_clip(440.0, 3, rate=rate, seconds=180)
    soundfile.write(str(tmp_path / "long.wav"), three_minutes, rate)
    soundfile.write(str(tmp_path / "start.wav"), three_minutes[:needed], rate)  # exactly what the encoder looks at
    waveform, _ = read_audio_file(tmp_path / "long.wav", lambda r: audio_frames_needed(encoder, r))
    assert waveform.shape == (1, 1, needed)

    encode = audio_encode_fn(encoder)
    peaks, features = {}, {}
    for name in ("start", "long"):
        tracemalloc.start()  # numpy's buffers (the decoded audio) are traced; torch's are not
        features[name], errors = encode([AudioClip(tmp_path / f"{name}.wav", "x")])
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert errors == [None]
    # Decoding all 3 minutes would hold 11.5 MB of float32 samples: the long file costs what its start costs.
    assert peaks["long"] < peaks["start"] + 2**20, peaks
    # ...and its features are those of the fully decoded file, as the nodes compute them.
    full, full_rate = read_audio_file(tmp_path / "long.wav")
    assert full.shape[-1] == 180 * rate
    expected = encoder.encode_audio(full, full_rate)[0]
    torch.testing.assert_close(features["long"][0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features["start"][0], expected, rtol=1e-5, atol=1e-6)
