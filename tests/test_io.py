"""oprd_cli.io: atomic publication of small files, locally and on fsspec URLs."""

from __future__ import annotations

import os

import fsspec
import pytest

from oprd_cli import io


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.json"
    io.write_json(p, {"b": 1, "a": [1, 2]})
    io.write_json(p, {"c": 3})
    assert io.read_json(p) == {"c": 3}
    assert sorted(os.listdir(p.parent)) == ["a.json"]
    assert io.read_json(tmp_path / "missing.json") is None


def test_failed_replace_keeps_old_content(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    io.atomic_write_text(p, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        io.atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_fsspec_url_is_one_put():
    url = "memory://oprd-io-test/x/marker.json"
    io.write_json(url, {"complete": True})
    assert io.read_json(url) == {"complete": True}
    fs = fsspec.filesystem("memory")
    assert fs.ls("/oprd-io-test/x", detail=False) == ["/oprd-io-test/x/marker.json"]


def test_atomic_target_keeps_suffix_and_cleans_up_on_error(tmp_path):
    p = tmp_path / "plot.png"
    with io.atomic_target(p) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert p.read_bytes() == b"png"
    with pytest.raises(RuntimeError):
        with io.atomic_target(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert p.read_bytes() == b"png"
    assert os.listdir(tmp_path) == ["plot.png"]
