"""Bridge-trainer data: the official TSV and sidecar folders, skipped-and-counted bad pairs, the official
transform, and the VAE-latent cache (both flips, reuse, invalidation, per-rank shards)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import support.bridge_training as bt
from support.training import rewrite_shard
from x2i.training.bridge_data import CachedLatentDataset, CaptionTokenizer, ImageCaptionDataset
from x2i.training.image_data import BridgeDataError, image_transform, load_image, scan_pairs, split_validation
from x2i.training.latent_cache import LatentCache, cache_key, encode_both_flips
from x2i.training.shards import INDEX_FILE

# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t5_tokenizer(tiny_t5):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_t5, local_files_only=True)


def test_tsv_pairs_relative_and_absolute_paths_with_bad_lines_skipped_and_counted(tmp_path, caplog):
    tsv = bt.write_squares_tsv(tmp_path, 4)
    elsewhere = tmp_path / "other" / "abs.png"
    elsewhere.parent.mkdir()
    Image.new("RGB", (40, 24), (1, 2, 3)).save(elsewhere)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    lines = tsv.read_bytes() + b"\n".join([
        b"",  # blank lines are layout, not pairs
        f"{elsewhere}\tan absolute path".encode(),
        b"images/missing.png\ta caption",
        b"images/broken.png\ta caption",
        b"images/0_0.png\t   ",
        b"no tab on this line",
        "images/0_1.png\tcaf\xe9".encode("latin-1"),
        b"",
    ])
    tsv.write_bytes(lines)
    with caplog.at_level(logging.WARNING, logger="x2i.training.image_data"):
        items, report = scan_pairs(tsv)
    assert [i.image.name for i in items] == ["0_0.png", "0_1.png", "0_2.png", "0_3.png", "abs.png"]
    assert items[0].caption == "a red square on the left" and items[0].image.is_absolute()
    assert items[-1].caption == "an absolute path"
    assert report.counts() == {
        "pairs_found": 10, "pairs_usable": 5, "skipped_empty_caption": 1, "skipped_missing_image": 1,
        "skipped_no_tab": 1, "skipped_undecodable_text": 1, "skipped_unreadable_image": 1,
    }
    logged = caplog.text
    assert "pairs.tsv line 7" in logged and "missing image" in logged and "5 of 10 pairs skipped" in logged


def test_folder_with_sidecar_captions_recursive(tmp_path):
    folder = bt.write_squares_folder(tmp_path / "set", 3)
    nested = folder / "more"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "x.jpg")
    (nested / "x.txt").write_text("  a   nested\n caption ")
    Image.new("RGB", (8, 8)).save(folder / "nocap.png")
    Image.new("RGB", (8, 8)).save(folder / "empty.png")
    (folder / "empty.txt").write_text("\n")
    items, report = scan_pairs(folder)
    assert [(i.image.name, i.caption) for i in items] == [
        ("0.png", "a red square on the left"), ("1.png", "a green square on the left"), ("2.png", "a blue square on the left"),
        ("x.jpg", "a nested caption"),
    ]
    assert report.skipped == {"missing caption": 1, "empty caption": 1}


def test_no_usable_pair_is_a_clear_error(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a.png\tcaption\nb.png\n")
    with pytest.raises(BridgeDataError, match=r"no usable image-caption pairs \(1 no tab, 1 missing image\).*image_path<TAB>caption"):
        scan_pairs(tsv)
    with pytest.raises(BridgeDataError, match="does not exist"):
        scan_pairs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BridgeDataError, match="none found"):
        scan_pairs(tmp_path / "empty")


def test_official_transform_resize_center_crop_normalise(tmp_path):
    image = Image.new("RGB", (60, 30), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 15, 30))  # the left quarter black: cut off by the center crop
    image.save(tmp_path / "wide.png")
    Image.new("LA", (16, 16), (0, 255)).save(tmp_path / "grey.png")
    pixels = load_image(tmp_path / "wide.png", image_transform(16))
    assert pixels.shape == (3, 16, 16)
    assert pixels.max() == 1.0 and pixels.min() >= -1.0
    assert torch.all(pixels[:, :, 2:] == 1.0)  # Resize(16) -> 32x16, CenterCrop keeps columns 8..23
    assert load_image(tmp_path / "grey.png", image_transform(8)).shape == (3, 8, 8)


def test_dataset_items_and_an_image_that_broke_after_the_scan(tmp_path, t5_tokenizer, caplog):
    items, _ = scan_pairs(bt.write_squares_tsv(tmp_path, 3))
    dataset = ImageCaptionDataset(items, image_transform(16), CaptionTokenizer("t5_unet", t5_tokenizer))
    sample = dataset[0]
    assert sample["pixels"].shape == (3, 16, 16)
    assert sample["input_ids"].shape == sample["attention_mask"].shape == (77,)
    assert sample["attention_mask"].sum() == len(t5_tokenizer("a red square on the left")["input_ids"])
    items[1].image.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        replaced = dataset[1]
    assert torch.equal(replaced["input_ids"], dataset[2]["input_ids"]) and dataset.decode_failures == 1
    assert "no longer decodes" in caplog.text


def test_validation_split_is_seeded_and_disjoint():
    train, val = split_validation(3, 10)
    assert (train, val) == split_validation(3, 10) and len(val) == 3 and not set(train) & set(val)
    assert sorted(train + val) == list(range(10))
    with pytest.raises(BridgeDataError, match="leaves nothing"):
        split_validation(10, 10)


# ---- latent cache --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae():
    return bt.tiny_vae().requires_grad_(False)


def _cache(folder: Path, items, shard_size: int = 4, **settings) -> LatentCache:
    return LatentCache(folder, items, cache_key(items, {"resolution": 32, **settings}, "vae-v1"), shard_size=shard_size)


def test_latent_cache_holds_both_flips_exactly_as_the_vae_encodes_them(tmp_path, vae, t5_tokenizer):
    items, _ = scan_pairs(bt.write_squares_tsv(tmp_path / "data", 6))
    transform = image_transform(32)
    cache = _cache(tmp_path / "cache", items)
    assert cache.state().state == "absent"
    assert cache.build_shards(vae, transform, torch.device("cpu"), batch_size=4) == 2
    assert cache.state().state == "partial"  # shards done, index not yet written
    cache.write_index()
    assert cache.state().state == "complete"
    locations, undecodable = cache.read_index()
    assert [item for item, _, _ in locations] == list(range(6)) and undecodable == []
    dataset = CachedLatentDataset(cache, locations, CaptionTokenizer("t5_unet", t5_tokenizer))
    pixels = torch.stack([load_image(i.image, transform) for i in items])
    with torch.no_grad():
        plain = vae.encode(pixels).latent_dist
        flipped = vae.encode(pixels.flip(-1)).latent_dist
    for i in range(6):
        sample = dataset[i]
        assert sample["latent_mean"].shape == (2, 4, 8, 8) and sample["latent_mean"].dtype == torch.float32
        torch.testing.assert_close(sample["latent_mean"][0], plain.mean[i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(sample["latent_mean"][1], flipped.mean[i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(sample["latent_std"][1], flipped.std[i], atol=1e-3, rtol=2e-3)
    # The flipped latent is not the flipped unflipped latent: the VAE is not flip-equivariant, hence both.
    assert not torch.allclose(plain.mean.flip(-1), flipped.mean, atol=1e-3)
    mean, std = encode_both_flips(vae, pixels[:2], torch.device("cpu"))
    assert mean.dtype == std.dtype == torch.float16 and mean.shape == (2, 2, 4, 8, 8)
    from safetensors import safe_open

    with safe_open(str(cache.shard_path(0)), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "x2i.bridge-latents/1" and meta["key"] == cache.key and json.loads(meta["kept"]) == [0, 1, 2, 3]


def test_latent_cache_is_reused_only_when_identical_and_resumes_shard_by_shard(tmp_path, vae):
    tsv = bt.write_squares_tsv(tmp_path / "data", 6)
    items, _ = scan_pairs(tsv)
    transform = image_transform(32)
    cpu = torch.device("cpu")
    cache = _cache(tmp_path / "cache", items)
    cache.build_shards(vae, transform, cpu)
    cache.write_index()
    stamp = cache.shard_path(0).stat().st_mtime_ns
    again = _cache(tmp_path / "cache", scan_pairs(tsv)[0])
    assert again.state().state == "complete" and again.build_shards(vae, transform, cpu) == 0
    assert cache.shard_path(0).stat().st_mtime_ns == stamp
    # Other settings or another caption: another key, the old files are stale and rebuilt.
    assert _cache(tmp_path / "cache", items, resolution=64).state().state == "stale"
    lines = tsv.read_text().splitlines()
    lines[5] = lines[5].replace("square", "box")
    tsv.write_text("\n".join(lines) + "\n")
    changed = _cache(tmp_path / "cache", scan_pairs(tsv)[0])
    assert changed.key != cache.key and changed.state().state == "stale"
    assert changed.build_shards(vae, transform, cpu) == 2
    changed.write_index()
    # An interrupted build: only the missing shard is encoded again.
    changed.shard_path(1).unlink()
    (changed.folder / INDEX_FILE).unlink()
    assert changed.state().state == "partial" and changed.missing_shards() == [1]
    assert changed.build_shards(vae, transform, cpu) == 1 and changed.shard_path(0).stat().st_mtime_ns != stamp


def test_latent_cache_shards_split_over_ranks_and_undecodable_images_skipped(tmp_path, vae, caplog):
    items, _ = scan_pairs(bt.write_squares_tsv(tmp_path / "data", 10))
    items[5].image.write_bytes(b"broken after the scan")
    transform = image_transform(32)
    cpu = torch.device("cpu")
    cache = _cache(tmp_path / "two", items)
    assert cache.missing_shards(0, 2) == [0, 2] and cache.missing_shards(1, 2) == [1]
    with caplog.at_level(logging.WARNING):
        assert cache.build_shards(vae, transform, cpu, rank=1, world_size=2) == 1
    with pytest.raises(BridgeDataError, match="missing"):
        cache.write_index()  # rank 0's shards are not there yet
    assert cache.build_shards(vae, transform, cpu, rank=0, world_size=2) == 2
    cache.write_index()
    locations, undecodable = cache.read_index()
    assert undecodable == [5] and [i for i, _, _ in locations] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert "does not decode" in caplog.text
    single = _cache(tmp_path / "one", items)
    single.build_shards(vae, transform, cpu)
    single.write_index()
    assert single.read_index() == (locations, undecodable)


def test_latent_shards_from_another_build_or_truncated_are_named_and_the_only_ones_encoded_again(tmp_path, vae, caplog):
    items, _ = scan_pairs(bt.write_squares_tsv(tmp_path / "data", 10))  # shards of 4: 4 + 4 + 2
    transform, cpu = image_transform(32), torch.device("cpu")
    cache, other = _cache(tmp_path / "cache", items), _cache(tmp_path / "other", items, resolution_note="another build")
    for built in (cache, other):
        built.build_shards(vae, transform, cpu)
        built.write_index()
    from safetensors.torch import load_file

    expected = {s: {k: v.clone() for k, v in load_file(str(cache.shard_path(s))).items()} for s in (0, 2)}  # not views of the files
    other.shard_path(1).replace(cache.shard_path(1))
    cache.shard_path(2).write_bytes(cache.shard_path(2).read_bytes()[:-7])
    state = cache.state()
    assert (state.state, state.shards_done) == ("broken", 1)
    assert state.problems[0].startswith("shard-00001.safetensors: from another dataset, VAE or setting")
    assert state.problems[1].startswith("shard-00002.safetensors: unreadable or truncated")
    # Read as it is (nothing to encode with): refused, naming the shards and what to do.
    with pytest.raises(BridgeDataError, match=r"shard-00001\.safetensors: from another.*shard-00002\.safetensors: unreadable.*delete"):
        cache.read_index()
    # Built: exactly the two bad shards, each named in the log.
    assert cache.missing_shards() == [1, 2]
    with caplog.at_level(logging.WARNING):
        assert cache.build_shards(vae, transform, cpu) == 2
    assert "shard-00001.safetensors: from another dataset" in caplog.text and "shard-00002.safetensors: unreadable" in caplog.text
    cache.write_index()
    assert cache.state().state == "complete"
    for s in (0, 2):  # shard 0 kept, shard 2 encoded again to the same latents
        assert all(torch.equal(load_file(str(cache.shard_path(s)))[k], v) for k, v in expected[s].items())
    # A shard with other tensors or another latent shape under the right key is as unusable.
    rewrite_shard(cache.shard_path(0), lambda t, m: t.update(mean=t["mean"][:, :, :, :4].contiguous()))
    assert "mean F16 [4, 2, 4, 4, 8] and std F16 [4, 2, 4, 8, 8]" in cache.state().problems[0]
    rewrite_shard(cache.shard_path(0), lambda t, m: t.update(mean=t["std"].float(), std=t["std"].float()))
    assert "expected F16 [4, 2, C, h, w]" in cache.state().problems[0]


def test_a_nan_latent_read_while_training_names_its_shard(tmp_path, vae, t5_tokenizer):
    items, _ = scan_pairs(bt.write_squares_tsv(tmp_path / "data", 6))
    cache = _cache(tmp_path / "cache", items)
    cache.build_shards(vae, image_transform(32), torch.device("cpu"))
    cache.write_index()

    def poison(tensors, metadata):
        tensors["std"][1, 0, 2, 3, 3] = float("inf")  # changed after the build

    rewrite_shard(cache.shard_path(0), poison)
    locations, _ = cache.read_index()  # headers as built: the values are checked where they are read
    dataset = CachedLatentDataset(cache, locations, CaptionTokenizer("t5_unet", t5_tokenizer))
    assert dataset[0]["latent_mean"].shape == (2, 4, 8, 8) and dataset[5]["latent_std"].isfinite().all()
    with pytest.raises(BridgeDataError, match=r"latent cache shard shard-00000\.safetensors holds NaN or infinite values \(row 1\).*Delete it"):
        dataset[1]
    from x2i.training import TrainingError

    assert issubclass(BridgeDataError, TrainingError) and issubclass(BridgeDataError, ValueError)


class NaNForRedSquares(torch.nn.Module):
    """The tiny VAE, except that images with a red square come out NaN (as an fp16 VAE that overflows)."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def encode(self, pixels):
        out = self.vae.encode(pixels)
        red = ((pixels[:, 0] > 0.7) & (pixels[:, 1] < -0.7)).flatten(1).any(dim=1)
        out.latent_dist.mean[red] = float("nan")
        return out


def test_an_image_with_non_finite_latents_is_skipped_and_counted(tmp_path, vae, caplog):
    items, _ = scan_pairs(bt.write_squares_tsv(tmp_path / "data", 10))
    red = [i for i, item in enumerate(items) if "red" in item.caption]
    assert red and len(red) < 10
    cache = _cache(tmp_path / "cache", items)
    with caplog.at_level(logging.WARNING):
        cache.build_shards(NaNForRedSquares(vae), image_transform(32), torch.device("cpu"))
    cache.write_index()
    locations, undecodable = cache.read_index()
    assert [i for i, _, _ in locations] == [i for i in range(10) if i not in red]
    assert undecodable == [] and cache.non_finite == red and cache.state().state == "complete"
    assert "gives NaN or infinite latents; skipped" in caplog.text
