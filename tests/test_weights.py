"""weights.py: the one safe way the pack reads pickles and builds networks from files."""

from __future__ import annotations

import pytest
import torch

from x2i.gluenet import GlueNetFileError, load_gluenet
from x2i.weights import build_and_load, torch_reads_pickles_safely


@pytest.mark.parametrize(("version", "safe"), [
    ("2.5.1+cu124", False), ("2.4.0", False), ("1.13.1", False), ("2.6.0", True), ("2.11.0+cu130", True),
    ("2.10.0.dev20260101", True), ("3.0.0", True), ("unknown", False),
])
def test_pickles_are_read_only_where_torch_reads_them_safely(version, safe):
    assert torch_reads_pickles_safely(version) is safe


def test_an_unsafe_torch_refuses_pickles_naming_the_cve_and_the_fix(small_text_gluenet_ckpt, monkeypatch):
    assert load_gluenet(small_text_gluenet_ckpt) is not None
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")  # a user's older torch
    with pytest.raises(GlueNetFileError, match=r"this torch 2\.5\.1\+cu124 cannot read pickles safely .*CVE-2025-32434.*"
                       r"Upgrade torch to 2\.6 or newer in ComfyUI's Python, or use a \.safetensors copy"):
        load_gluenet(small_text_gluenet_ckpt)


def test_build_and_load_checks_shapes_before_building_and_then_loads_strictly():
    built = []

    def factory() -> torch.nn.Module:
        built.append(torch.empty(0).device.type)
        return torch.nn.Linear(3, 2)

    weights = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    model = build_and_load(factory, weights, ValueError, "linear")
    assert torch.equal(model.weight, weights["weight"]) and built == ["meta", "cpu"]
    built.clear()
    with pytest.raises(ValueError, match=r"linear: missing 1 \(e\.g\. bias\); wrong shapes 1 \(e\.g\. weight: file \(2, 4\) vs model \(2, 3\)\)"):
        build_and_load(factory, {"weight": torch.ones(2, 4)}, ValueError, "linear")
    assert built == ["meta"]  # never built for real


def test_a_failed_write_leaves_the_old_file_and_no_temp_file_and_says_oserror(tmp_path):
    from x2i.weights import write_atomic, write_text_atomic

    target = tmp_path / "index.json"
    write_text_atomic(target, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise ValueError("no space left on the serializer")

    with pytest.raises(OSError, match=r"cannot write .*index.json \(ValueError: no space left on the serializer\)"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
