"""paths.py: the one rule that turns a node input's name into a path (ComfyUI's get_full_path rule)."""

from __future__ import annotations

import os
from pathlib import Path

from x2i.paths import contained, disk_state, find_in_folders


def test_names_cannot_leave_their_folder_but_symlinks_inside_it_are_followed(tmp_path: Path) -> None:
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    (tmp_path / "secret.ckpt").write_text("outside")
    (elsewhere / "big.ckpt").write_text("on another disk")
    (models / "linked").symlink_to(elsewhere, target_is_directory=True)

    assert contained(str(models), "../secret.ckpt") == str(models / "secret.ckpt")
    assert contained(str(models), "/etc/passwd") == str(models / "etc" / "passwd")
    assert find_in_folders([str(models)], "../secret.ckpt", os.path.isfile) is None
    assert find_in_folders([str(models)], str(tmp_path / "secret.ckpt"), os.path.isfile) is None
    assert find_in_folders([str(models)], "linked/big.ckpt", os.path.isfile) == str(models / "linked" / "big.ckpt")
    for bad in ("", "a\0b", None, 7):
        assert find_in_folders([str(models)], bad, os.path.exists) is None


def test_the_first_folder_that_holds_the_name_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
    (second / "x.ckpt").write_text("2")

    assert find_in_folders([str(first), str(second)], "x.ckpt", os.path.isfile) == str(second / "x.ckpt")
    (first / "x.ckpt").write_text("1")
    assert find_in_folders([str(first), str(second)], "x.ckpt", os.path.isfile) == str(first / "x.ckpt")


def test_disk_state_changes_when_a_file_in_a_model_folder_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = disk_state(str(folder))

    (folder / "model.safetensors").write_bytes(b"12345")
    after = disk_state(str(folder))

    assert before != after and [entry[0] for entry in after] == ["config.json", "model.safetensors"]
    assert disk_state(str(tmp_path / "missing")) is None
    assert disk_state(str(folder / "config.json")) == (2, os.stat(folder / "config.json").st_mtime_ns)
