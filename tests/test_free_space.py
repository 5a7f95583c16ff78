"""The free-space check counts only what will be written: linked shards and, on --resume,
files the interrupted run finished are not counted again."""

from __future__ import annotations

import sys
from collections import namedtuple
from pathlib import Path

import pytest

from gdnfuse.convert import convert
from gdnfuse.errors import GdnfuseError
from gdnfuse.synthetic import write_checkpoint

CONVERT = sys.modules["gdnfuse.convert"]  # the module (gdnfuse.convert is the function)

Usage = namedtuple("Usage", "total used free")


class Stop(Exception):
    pass


def _free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(CONVERT.shutil, "disk_usage", lambda p: Usage(free, 0, free))


def test_resume_checks_only_the_remaining_bytes(tmp_path: Path, monkeypatch) -> None:
    src = write_checkpoint(tmp_path / "src", "tiny", shard_bytes=100_000)
    out = tmp_path / "out"
    copied = []

    def stop_after_first_file(n: int) -> None:
        copied.append(n)
        if sum(copied) > 150_000:
            raise Stop

    with pytest.raises(Stop):
        convert(src, out, workers=1, progress=stop_after_first_file)
    total = sum(p.stat().st_size for p in src.iterdir())
    done = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    assert 0 < done < total

    _free(monkeypatch, total - done // 2)  # enough for the rest, not for everything
    with pytest.raises(GdnfuseError, match="not enough free space"):
        convert(src, tmp_path / "fresh")
    convert(src, out, resume=True)
    assert (out / "model.safetensors.index.json").is_file()


def test_link_mode_does_not_count_linked_shards(tmp_path: Path, monkeypatch) -> None:
    src = write_checkpoint(tmp_path / "src", "tiny", shard_bytes=20_000)
    plan = CONVERT.plan_source(src)
    assert plan.bytes_untouched > 0
    _free(monkeypatch, plan.plan.total_bytes - plan.bytes_untouched + 1)
    with pytest.raises(GdnfuseError, match="not enough free space"):
        convert(src, tmp_path / "a")
    convert(src, tmp_path / "b", link=True)
