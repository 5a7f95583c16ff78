"""Inputs and situations found in review: each once produced a wrong output, a deleted file
outside --out, or a traceback instead of one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdnfuse.checkpoint import INDEX_NAME, open_checkpoint
from gdnfuse.convert import MANIFEST_NAME, convert
from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import Layout
from gdnfuse.synthetic import write_checkpoint
from gdnfuse.verify import verify


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gdnfuse.cli", *args], capture_output=True,
                          text=True)  # fmt: skip


def cannot_convert_note(p: subprocess.CompletedProcess[str]) -> str:
    """inspect's verdicts (exit 0) and its one line on why it cannot convert (issue 20)."""
    assert p.returncode == 0, p.stderr
    notes = [ln for ln in p.stderr.splitlines() if ln.startswith("note: cannot convert")]
    assert len(notes) == 1 and "LOADS" in p.stdout, p.stderr
    return notes[0]


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    return lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "src", "tiny", shard_bytes=20_000)


class Stop(Exception):
    pass


def interrupt_after(nbytes: int):
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] > nbytes:
            raise Stop

    return progress


def test_link_follows_symlinked_shards_like_a_hub_snapshot(src: Path, tmp_path: Path) -> None:
    """A Hub snapshot is relative symlinks into blobs/; link(2) would link the symlink."""
    snap = tmp_path / "cache" / "snapshots" / "abc"
    blobs = tmp_path / "cache" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    out = tmp_path / "out"
    result = convert(snap, out, link=True)
    assert result.bytes_linked > 0
    for f in result.files:
        assert not (out / f.name).is_symlink()
        if f.linked:
            assert (out / f.name).stat().st_ino == (blobs / f.name).stat().st_ino
    assert verify(out, against=src, numeric=False).ok


def test_overwrite_never_deletes_outside_out(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(src, out)
    victims = [tmp_path / "victim.txt", tmp_path / "elsewhere" / "victim2.txt"]
    for v in victims:
        v.parent.mkdir(exist_ok=True)
        v.write_text("keep me")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"].update({"../victim.txt": {}, str(victims[1]): {}})
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    convert(src, out, overwrite=True)
    assert all(v.read_text() == "keep me" for v in victims)


def test_overwrite_interrupted_then_resumed_leaves_no_stale_shard(
    src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    convert(src, out)
    other = write_checkpoint(tmp_path / "other", "tiny", shard_bytes=10_000_000, seed=1)
    assert {p.name for p in other.glob("*.safetensors")} != {
        p.name for p in src.glob("*.safetensors")
    }
    with pytest.raises(Stop):
        convert(other, out, overwrite=True, workers=1,
                progress=interrupt_after(1000))  # fmt: skip
    convert(other, out, resume=True)
    assert {p.name for p in out.glob("*.safetensors")} == {
        p.name for p in other.glob("*.safetensors")
    }
    open_checkpoint(out)  # no tensor in two shards, index consistent
    assert verify(out, against=other, numeric=False).ok


@pytest.mark.parametrize("changed", [{"checksum": True}, {"link": True}])
def test_resume_refuses_other_file_options(src: Path, tmp_path: Path, changed: dict) -> None:
    out = tmp_path / "out"
    with pytest.raises(Stop):
        convert(src, out, workers=1, progress=interrupt_after(50_000))
    with pytest.raises(GdnfuseError, match="but the interrupted run used (checksum|link)=False"):
        convert(src, out, resume=True, **changed)
    with pytest.raises(GdnfuseError) as e:
        convert(src, out, resume=True, **changed)
    assert "--overwrite" in e.value.for_cli() and "--" not in str(e.value)
    convert(src, out, resume=True)


def test_brackets_in_paths_are_text_not_markup(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o[/v2] [fp8]"
    p = cli("convert", str(src), "--out", str(out), "--tp", "2")
    assert p.returncode == 0, p.stderr
    assert "[fp8]" in p.stdout
    p = cli("verify", str(out), "--against", str(src), "--no-numeric")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[/v2]" in one_line_error(cli("inspect", str(tmp_path / "missing[/v2]")))


def test_dangling_side_file_is_one_line(src: Path) -> None:
    (src / "special_tokens_map.json").symlink_to("/nonexistent/blob")
    out = src.parent / "dangling-out"
    assert "special_tokens_map.json" in one_line_error(cli("convert", str(src), "--out", str(out)))
    assert "special_tokens_map.json" in cannot_convert_note(cli("inspect", str(src)))


@pytest.mark.parametrize(
    "edit",
    [
        lambda idx: idx.update(metadata=[1]),
        lambda idx: idx["weight_map"].update({next(iter(idx["weight_map"])): ["x"]}),
        lambda idx: idx["weight_map"].update({next(iter(idx["weight_map"])): 3}),
    ],
)
def test_malformed_index_is_one_line(src: Path, edit) -> None:
    index = json.loads((src / INDEX_NAME).read_text())
    edit(index)
    (src / INDEX_NAME).write_text(json.dumps(index))
    out = src.parent / "malformed-out"
    assert INDEX_NAME in one_line_error(cli("convert", str(src), "--out", str(out)))
    assert INDEX_NAME in cannot_convert_note(cli("inspect", str(src)))


def test_text_config_without_dims_is_refused_not_defaulted(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"]
    for key in [k for k in text if k.startswith("linear_")] + ["hidden_size"]:
        config[key] = text.pop(key)
    (src / "config.json").write_text(json.dumps(config))
    assert "text_config" in one_line_error(cli("inspect", str(src)))


def test_safetensors_not_named_by_the_index_are_left_out(src: Path, tmp_path: Path) -> None:
    first = sorted(src.glob("*.safetensors"))[0]
    (src / "consolidated.safetensors").write_bytes(first.read_bytes())
    out = tmp_path / "out"
    result = convert(src, out, layout=Layout.TP_BLOCKED, tp=2)
    assert result.summary()["ignored_files"] == ["consolidated.safetensors"]
    assert not (out / "consolidated.safetensors").exists()
    assert verify(out, against=src, numeric=False).ok


def test_unicode_digits_in_names_do_not_crash(tmp_path: Path) -> None:
    from gdnfuse.model import natural_key

    assert natural_key("layers.1²2.x") == ["layers.", 1, "²", 2, ".x"]
    assert sorted(["layers.10", "layers.9"], key=natural_key) == ["layers.9", "layers.10"]


def test_verify_reports_malformed_output_without_traceback(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(src, out)
    index = json.loads((out / INDEX_NAME).read_text())
    index["metadata"] = [1]
    (out / INDEX_NAME).write_text(json.dumps(index))
    p = cli("verify", str(out), "--against", str(src), "--no-numeric")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "structure.total_size" in p.stdout

    config = json.loads((out / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = None
    (out / "config.json").write_text(json.dumps(config))
    assert "rms_norm_eps" in one_line_error(cli("verify", str(out)))
