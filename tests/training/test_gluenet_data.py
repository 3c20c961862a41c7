"""GlueNet training data, targets and feature caches: what is read, what is refused, what is skipped
and counted, and that cached features are exactly what the encoders give."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from support.training import (
    make_clip_text_folder,
    make_clip_tokenizer,
    parallel_corpus,
    rewrite_shard,
    write_parallel_files,
    write_point_cloud_folder,
    write_sd1_checkpoint,
    write_sound_folders,
    write_urbansound8k,
)
from x2i.training.features import FeatureCache, FeatureCacheError
from x2i.training.fingerprints import fingerprint_path
from x2i.training.gluenet_data import OFFICIAL_US8K_LABEL_PROMPTS, DataError, GlueNetDataSettings
from x2i.training.gluenet_listing import build_listing, class_prompts, read_parallel_files
from x2i.training.gluenet_sources import audio_encode_fn, read_audio_file, target_encode_fn
from x2i.training.targets import (
    TargetError,
    TargetSettings,
    check_target_width,
    default_tokenizer_folder,
    load_target_encoder,
    peek_target_width,
)

# ---- parallel text --------------------------------------------------------------------------------


def test_misaligned_parallel_files_name_both_files_and_counts(tmp_path: Path):
    (tmp_path / "a.fr").write_text("un\ndeux\ntrois\n", encoding="utf-8")
    (tmp_path / "a.en").write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.fr has 3 lines, .*a\.en has 2"):
        read_parallel_files(tmp_path / "a.fr", tmp_path / "a.en", "error", Counter())


def test_empty_lines_are_skipped_and_counted_and_only_newline_splits(tmp_path: Path, caplog):
    # BOM, CRLF, a final line without newline, a U+2028 inside a caption (str.splitlines would split there).
    (tmp_path / "s.txt").write_bytes("\ufeffun chat\r\n\r\ndeux\u2028chiens\n   \ntrois".encode())
    (tmp_path / "t.txt").write_bytes(b"a cat\r\nempty source\ntwo dogs\nfour\n\n")
    skipped = Counter()
    with caplog.at_level(logging.WARNING):
        pairs = read_parallel_files(tmp_path / "s.txt", tmp_path / "t.txt", "error", skipped)
    assert pairs == [("un chat", "a cat"), ("deux\u2028chiens", "two dogs")]
    assert skipped == {"empty_line": 3}
    assert "line 2: source side is empty" in caplog.text


def test_undecodable_text_is_an_error_naming_file_and_line_or_skipped_on_request(tmp_path: Path):
    (tmp_path / "s.txt").write_bytes(b"un\n" + "café".encode("latin-1") + b"\ntrois\n")
    (tmp_path / "t.txt").write_text("one\ncoffee\nthree\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.txt, line 2 \(byte 6 of the file\) is not valid UTF-8.*iconv"):
        read_parallel_files(tmp_path / "s.txt", tmp_path / "t.txt", "error", Counter())
    skipped = Counter()
    assert read_parallel_files(tmp_path / "s.txt", tmp_path / "t.txt", "skip", skipped) == [("un", "one"), ("trois", "three")]
    assert skipped == {"undecodable": 1}


def test_tsv_and_jsonl_pairs(tmp_path: Path):
    (tmp_path / "p.tsv").write_text("1.05\ta red cat\tun chat rouge\nbroken row\n0.9\ta dog\tun chien\n", encoding="utf-8")
    settings = GlueNetDataSettings(pairs_file=str(tmp_path / "p.tsv"), tsv_columns=[2, 1], val_fraction=0)
    with pytest.raises(DataError, match=r"p\.tsv, line 2 has 1 tab-separated column\(s\)"):
        build_listing(settings)
    settings.on_bad_line = "skip"
    listing = build_listing(settings)
    assert list(zip(listing.sources, listing.target_texts, strict=True)) == [("un chat rouge", "a red cat"), ("un chien", "a dog")]
    assert listing.skipped == {"malformed": 1}
    lines = [json.dumps({"source": "猫", "target": "a cat"}), "", json.dumps({"source": "狗"}), json.dumps({"source": "鸟", "target": "a bird"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines), encoding="utf-8")
    listing = build_listing(GlueNetDataSettings(pairs_file=str(tmp_path / "p.jsonl"), on_bad_line="skip", val_fraction=0))
    assert listing.sources == ["猫", "鸟"] and listing.skipped == {"empty_line": 1, "malformed": 1}


def test_validation_split_is_deterministic_and_sized(tmp_path: Path):
    source, target = write_parallel_files(tmp_path, parallel_corpus())
    settings = GlueNetDataSettings(source_file=str(source), target_file=str(target), val_fraction=0.1)
    first, again, other = build_listing(settings, seed=3), build_listing(settings, seed=3), build_listing(settings, seed=4)
    assert first.val == again.val and first.val != other.val
    assert first.num_val == 18 and first.num_train == 162
    settings.max_samples = 20
    assert len(build_listing(settings).samples) == 20


# ---- audio ------------------------------------------------------------------------------------


def test_urbansound8k_layout_folds_prompts_and_missing_files(tmp_path: Path):
    root = write_urbansound8k(tmp_path / "us8k", clips_per_fold=1, folds=3)
    (root / "audio" / "fold2" / "2000-1-0-0.wav").unlink()  # listed in the CSV, gone from disk
    settings = GlueNetDataSettings(modality="audio", audio_dir=str(root), train_folds=[2, 3], val_folds=[1])
    listing = build_listing(settings)
    assert listing.skipped == {"missing_file": 1}
    assert len(listing.samples) == 11 and listing.num_val == 4  # fold 1 held out, as GlueGen did
    assert all(clip.fold == 1 for clip, held in zip(listing.sources, listing.val, strict=True) if held)
    # The official synonyms and templates: "dog_bark" -> "a vivid photo of dog is barking", ...
    dog = next(i for i, clip in enumerate(listing.sources) if clip.label == "dog_bark")
    prompts = [listing.target_texts[t] for t in listing.samples[dog][1]]
    assert len(prompts) == 6 * len(OFFICIAL_US8K_LABEL_PROMPTS["dog bark"])
    assert "a vivid photo of dog is barking" in prompts and "a vivid illustration of doggy is barking" in prompts
    assert class_prompts("my_label", GlueNetDataSettings(prompt_templates=["{} sound"])) == ["my label sound"]
    settings.prompt_choice = "first"
    assert {len(c) for _, c in build_listing(settings).samples} == {1}


def test_class_folders_and_custom_label_prompts(tmp_path: Path):
    root = write_sound_folders(tmp_path / "sounds", clips_per_class=3)
    (root / "empty_class").mkdir()
    settings = GlueNetDataSettings(modality="audio", audio_dir=str(root), val_fraction=0.25,
                                   label_prompts={"siren": ["an ambulance"]}, prompt_templates=["a photo of {}"])
    listing = build_listing(settings)
    assert listing.labels == ["dog_bark", "drilling", "jackhammer", "siren"] and listing.num_val == 3
    assert listing.skipped == {"empty_class_folder": 1}
    siren = next(c for clip, (_, c) in zip(listing.sources, listing.samples, strict=True) if clip.label == "siren")
    assert [listing.target_texts[t] for t in siren] == ["a photo of an ambulance"]


def test_audio_files_are_read_with_soundfile_and_unreadable_ones_reported(tmp_path: Path):
    root = write_sound_folders(tmp_path / "sounds", clips_per_class=1)
    waveform, rate = read_audio_file(root / "siren" / "siren-0.wav")
    assert rate == 16000 and waveform.shape == (1, 1, 8000)
    (root / "siren" / "broken.wav").write_bytes(b"RIFF\x00\x00not audio")

    class FakeEncoder(torch.nn.Module):  # CLAP-like: encode_audio(waveform, rate)
        output_dim = 3

        def encode_audio(self, waveform, rate):
            return torch.tensor([[waveform.abs().max(), float(rate), waveform.shape[-1]]])

    listing = build_listing(GlueNetDataSettings(modality="audio", audio_dir=str(root), val_fraction=0))
    features, errors = audio_encode_fn(FakeEncoder())(listing.sources)
    broken = [i for i, clip in enumerate(listing.sources) if clip.path.name == "broken.wav"]
    assert [i for i, e in enumerate(errors) if e] == broken and errors[broken[0]].startswith("unreadable_audio: ")
    assert features[broken[0]].abs().sum() == 0 and features[0, 1] == 16000


# ---- point clouds -------------------------------------------------------------------------------


def test_point_cloud_folder_captions_split_by_cloud(tmp_path: Path):
    root = write_point_cloud_folder(tmp_path / "clouds", per_shape=3)
    (root / "sphere-0.txt").write_text("a round ball\na white sphere\n", encoding="utf-8")
    np.save(root / "orphan.npy", np.zeros((40, 3)))  # no caption file
    listing = build_listing(GlueNetDataSettings(modality="point_cloud", point_cloud_dir=str(root), val_fraction=0.25))
    assert len(listing.sources) == 12 and len(listing.samples) == 13 and listing.skipped == {"no_caption": 1}
    cloud_of = [s for s, _ in listing.samples]
    for cloud in set(cloud_of):  # the two captions of sphere-0 are both train or both val
        assert len({held for s, held in zip(cloud_of, listing.val, strict=True) if s == cloud}) == 1


def test_point_cloud_csv_listing(tmp_path: Path):
    root = write_point_cloud_folder(tmp_path / "clouds", per_shape=1)
    (tmp_path / "list.csv").write_text("path,caption\nclouds/cube-0.npy,a box\nclouds/missing.npy,gone\nclouds/rod-0.npy,  \n",
                                       encoding="utf-8")
    listing = build_listing(GlueNetDataSettings(modality="point_cloud", point_cloud_list=str(tmp_path / "list.csv"), val_fraction=0))
    assert listing.sources == [root / "cube-0.npy"] and listing.target_texts == ["a box"]
    assert listing.skipped == {"missing_file": 1, "empty_line": 1}


# ---- targets ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    state = write_sd1_checkpoint(root / "sd15.safetensors", hidden=32)
    make_clip_tokenizer(root / "tokenizer")
    return root, state


def test_sd1_checkpoint_target_is_clip_last_hidden_state_without_mask(clip_files):
    from transformers import CLIPTokenizer

    root, state = clip_files
    encoder = load_target_encoder(TargetSettings(clip=str(root / "sd15.safetensors"), tokenizer=str(root / "tokenizer")))
    assert encoder.hidden_size == 32 and not encoder.use_attention_mask
    texts = ["a red cat in a garden", "a dog"]
    features, errors = target_encode_fn(encoder)(texts)
    # The reference: transformers' CLIPTextModel with the file's weights, ids padded with the end token.
    from support.training import make_clip_text_model

    reference = make_clip_text_model(hidden=32)
    reference.load_state_dict(state)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert ids[1, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
    assert features.shape == (2, 77, 32) and errors == [None, None]
    torch.testing.assert_close(features, expected)
    assert peek_target_width(TargetSettings(clip=str(root / "sd15.safetensors"))) == 32


def test_hf_clip_folder_target_and_width_mismatch(tmp_path: Path):
    folder = make_clip_text_folder(tmp_path / "clip", hidden=48)
    settings = TargetSettings(clip=str(folder))
    encoder = load_target_encoder(settings)
    assert encoder.hidden_size == 48 and not encoder.use_attention_mask and peek_target_width(settings) == 48
    with pytest.raises(TargetError, match="clip gives 48-wide features but the GlueNet is configured to output 768"):
        check_target_width(48, 768, "clip")


def test_non_sd1_checkpoints_and_missing_tokenizer_are_named(tmp_path: Path, clip_files):
    from safetensors.torch import save_file

    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}, str(tmp_path / "sd21.safetensors"))
    with pytest.raises(TargetError, match="looks like SD2.x"):
        load_target_encoder(TargetSettings(clip=str(tmp_path / "sd21.safetensors"), tokenizer="x"))
    root, _ = clip_files
    pack = tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-X2I"
    pack.mkdir(parents=True)
    assert default_tokenizer_folder(pack) is None
    make_clip_tokenizer(tmp_path / "ComfyUI" / "comfy" / "sd1_tokenizer")
    assert default_tokenizer_folder(pack) == tmp_path / "ComfyUI" / "comfy" / "sd1_tokenizer"
    if default_tokenizer_folder() is None:  # this checkout is not inside a ComfyUI
        with pytest.raises(TargetError, match="set target.tokenizer"):
            load_target_encoder(TargetSettings(clip=str(root / "sd15.safetensors")))


# ---- feature caches -----------------------------------------------------------------------------


class CountingEncoder:
    """encode(items) -> features of one float per item (its length), failures for items named 'bad'."""

    def __init__(self, fail_at_call: int = 0) -> None:
        self.calls, self.items, self.fail_at_call = 0, 0, fail_at_call

    def __call__(self, items):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt  # a build killed half way
        self.items += len(items)
        values = torch.tensor([[float(len(x)), 1.0] for x in items])
        return values, ["unreadable_thing: cannot parse" if x == "bad" else None for x in items]


def test_cache_is_reused_when_identical_and_rebuilt_when_anything_changes(tmp_path: Path, caplog):
    items = [f"item {i}" * (i % 5) for i in range(10)] + ["bad"]
    fingerprint = {"encoder": {"path": "/e", "size": 1}, "data": "abc"}
    cache = FeatureCache(tmp_path, "source", fingerprint, len(items), dtype="fp16", shard_size=4)
    assert cache.state() == "missing"
    encoder = CountingEncoder()
    cache.build(items, encoder, (2,), batch_size=3)
    assert cache.state() == "complete" and encoder.items == 11
    features = cache.open()
    assert features[7].dtype == torch.float16 and features[7].tolist() == [float(len(items[7])), 1.0]
    assert features.valid.tolist() == [True] * 10 + [False] and features[10].abs().sum() == 0
    assert cache.summary()["skipped"] == {"unreadable_thing": 1}
    assert len(list(tmp_path.glob("source/shard-*.safetensors"))) == 3
    again = FeatureCache(tmp_path, "source", fingerprint, len(items), dtype="fp16", shard_size=4)
    again.build(items, CountingEncoder(), (2,))
    assert again.state() == "complete"  # no encoder call needed
    changed = FeatureCache(tmp_path, "source", {**fingerprint, "encoder": {"path": "/e", "size": 2}}, len(items), "fp16", 4)
    assert changed.state() == "stale (encoder.size changed)"
    with caplog.at_level(logging.INFO):
        changed.build(items, CountingEncoder(), (2,))
    assert "stale (encoder.size changed) -> building" in caplog.text and changed.state() == "complete"


def test_an_interrupted_build_keeps_finished_shards(tmp_path: Path):
    items = [str(i) for i in range(10)]
    cache = FeatureCache(tmp_path, "target", {"data": "x"}, len(items), shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        cache.build(items, CountingEncoder(fail_at_call=3), (2,), batch_size=2)
    assert cache.state() == "partial (1 shard(s) done)"
    resumed = CountingEncoder()
    cache.build(items, resumed, (2,), batch_size=2)
    assert resumed.items == 6 and cache.state() == "complete" and cache.open().gather([0, 9]).shape == (2, 2)


def test_fingerprints_follow_files_and_a_broken_shard_is_named(tmp_path: Path):
    weights = tmp_path / "model" / "weights.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"12345")
    first = fingerprint_path(weights.parent)
    assert first["files"][0]["size"] == 5 and "sha256" in fingerprint_path(weights, "sha256")["files"][0]
    weights.write_bytes(b"123456")
    assert fingerprint_path(weights.parent) != first
    cache = FeatureCache(tmp_path, "c", {"data": "y"}, 3)
    cache.build(["a", "b", "c"], CountingEncoder(), (2,))
    cache.shard_path(0).write_bytes(b"garbage")
    with pytest.raises(FeatureCacheError, match="unreadable"):
        cache._write_index()


# ---- shards checked when the cache is opened ----------------------------------------------------


def _built_cache(root: Path, fingerprint: dict, items: list[str]) -> FeatureCache:
    cache = FeatureCache(root, "source", fingerprint, len(items), dtype="fp16", shard_size=4)
    cache.build(items, CountingEncoder(), (2,), batch_size=4)
    return cache


BROKEN_SHARDS = {
    "another build": (lambda c, other: other.shard_path(1).replace(c.shard_path(1)), "from another build"),
    "truncated": (lambda c, other: c.shard_path(1).write_bytes(c.shard_path(1).read_bytes()[:-9]), "unreadable or truncated"),
    "wrong dtype": (lambda c, other: rewrite_shard(c.shard_path(1), lambda t, m: t.update(features=t["features"].float())),
                    "stores features as F32, the cache as F16"),
    "wrong keys": (lambda c, other: rewrite_shard(c.shard_path(1), lambda t, m: t.pop("valid")), "holds the tensors ['features']"),
    "wrong rows": (lambda c, other: rewrite_shard(c.shard_path(1), lambda t, m: t.update(features=t["features"][:3])),
                   "holds features of shape [3, 2], expected [4, 2]"),
}


@pytest.mark.parametrize("damage", list(BROKEN_SHARDS))
def test_a_broken_shard_is_named_refused_when_opened_and_the_only_one_encoded_again(tmp_path: Path, caplog, damage: str):
    items = [f"item {i}" * (i % 3 + 1) for i in range(10)]  # 3 shards: 4 + 4 + 2
    cache = _built_cache(tmp_path / "a", {"data": "a"}, items)
    other = _built_cache(tmp_path / "b", {"data": "b"}, items)  # the same layout from another build
    expected = cache.open().gather(list(range(10)))
    make_broken, problem = BROKEN_SHARDS[damage]
    make_broken(cache, other)
    state = cache.state()
    assert state.startswith("broken (shard-00001.safetensors: ") and problem in state, state
    # Opened as it is (no encoder at hand): refused, naming the shard and what to do.
    with pytest.raises(FeatureCacheError, match=r"shard-00001\.safetensors: .*delete the shard file"):
        cache.open()
    # Built (the trainer loads the encoder whenever the state is not complete): exactly that shard.
    encoder = CountingEncoder()
    with caplog.at_level(logging.INFO):
        cache.build(items, encoder, (2,), batch_size=4)
    assert encoder.items == 4 and cache.state() == "complete"
    assert f"shard-00001.safetensors: {problem}" in caplog.text and "encoding it again" in caplog.text
    torch.testing.assert_close(cache.open().gather(list(range(10))), expected)


def test_a_nan_row_read_while_training_names_its_shard(tmp_path: Path):
    items = [f"item {i}" for i in range(10)]
    cache = _built_cache(tmp_path, {"data": "nan"}, items)

    def poison(tensors, metadata):
        tensors["features"][2, 1] = float("nan")  # item 6, still marked valid: changed after the build

    rewrite_shard(cache.shard_path(1), poison)
    # The header is as built: the check at open costs headers only, so it cannot see values.
    assert cache.state() == "complete"
    features = cache.open()
    assert features.gather([0, 5, 9]).shape == (3, 2)  # rows without NaN read as usual
    with pytest.raises(FeatureCacheError, match=r"shard-00001\.safetensors holds NaN or infinite values \(row 2, item 6\).*Delete it"):
        features.gather([0, 6])
    from x2i.training import TrainingError

    assert issubclass(FeatureCacheError, TrainingError)  # the command line prints it as one error line


class NonFiniteEncoder:
    """Features of one float per item; NaN for "nan", inf for "inf", and 1e6 (beyond fp16) for "huge"."""

    def __call__(self, items):
        special = {"nan": float("nan"), "inf": float("inf"), "huge": 1e6}
        return torch.tensor([[special.get(x, float(len(x))), 1.0] for x in items]), [None] * len(items)


def test_an_encoder_giving_nan_or_inf_marks_the_item_unusable_and_counts_it(tmp_path: Path, caplog):
    items = ["a", "nan", "bb", "inf", "huge", "ccc"]
    cache = FeatureCache(tmp_path, "source", {"data": "x"}, len(items), dtype="fp16", shard_size=4)
    with caplog.at_level(logging.WARNING):
        cache.build(items, NonFiniteEncoder(), (2,), batch_size=2)
    features = cache.open()
    assert features.valid.tolist() == [True, False, True, False, False, True]
    assert cache.summary()["skipped"] == {"non-finite features": 3} and cache.summary()["num_valid"] == 3
    assert features.gather([1, 3, 4]).abs().sum() == 0  # stored as zeros, so reading them never trips the check
    assert "skipped nan (non-finite features: the encoder gave NaN or infinite values (stored as fp16))" in caplog.text
    # In fp32 the large value is finite and kept.
    wide = FeatureCache(tmp_path, "wide", {"data": "x"}, len(items), dtype="fp32", shard_size=4)
    wide.build(items, NonFiniteEncoder(), (2,), batch_size=2)
    assert wide.open().valid.tolist() == [True, False, True, False, True, True]
