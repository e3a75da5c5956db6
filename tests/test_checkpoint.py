"""training.checkpoint's atomic writes: the file is replaced in one step, a failure leaves the old one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import atomic_copy, atomic_folder, atomic_save, atomic_write_bytes, atomic_write_text


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_text_bytes_copy_and_tensors_land_whole(tmp_path):
    atomic_write_text(tmp_path / "deep" / "a.json", "{\"x\": 1}")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_copy(tmp_path / "b.bin", tmp_path / "c.bin")
    atomic_save({"w": torch.arange(3)}, tmp_path / "d.pt")
    assert (tmp_path / "deep" / "a.json").read_text() == "{\"x\": 1}"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(torch.load(tmp_path / "d.pt")["w"], torch.arange(3))
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "deep") == []


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    atomic_write_text(path, "old")

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save(Unsaveable(), path)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_folder_is_replaced_only_once_written(tmp_path):
    target = tmp_path / "model"
    atomic_folder(target, lambda folder: (folder / "config.json").write_text("1"))
    assert (target / "config.json").read_text() == "1"

    def fails(folder: Path) -> None:
        (folder / "config.json").write_text("2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_folder(target, fails)
    assert (target / "config.json").read_text() == "1" and _leftovers(tmp_path) == []
