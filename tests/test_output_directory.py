"""The output directory under adversarial use (faults a tester found, issue 13): each test
reproduces one, with real processes, signals, tmpfs and bind mounts where the fault needs
them (CI runs as root).

1. two runs on one --out: the second is refused at once naming the first; a killed run's
   lock does not block --resume; 2. --overwrite after an interrupted run (or an interrupted
   clean-up) leaves exactly the new output plus the user's own files; 3. --link onto another
   filesystem is counted as copying; 4. non-UTF-8 names; 5. --resume after the source
   changed; 6. a FIFO in the source; 7. symlinked folders; 8. bind mounts, --fsync of
   directories, --layers and mtp, layer_types, gdnfuse's own names in a source, unindexed
   shards in verify.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corrupt import (
    JOURNAL,
    STATE,
    cli,
    digests,
    error_line,
    looks_complete,
    run_cli,
    sigint_default,
    weight_map,
)
from test_crash_safety import _stopped, fill, small_fs  # noqa: F401 (small_fs is a fixture)

from gdnfuse.convert import MANIFEST_NAME, convert
from gdnfuse.errors import GdnfuseError
from gdnfuse.synthetic import write_checkpoint
from gdnfuse.verify import verify

OPTS: dict[str, Any] = {"workers": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("base") / "src", "tiny", shard_bytes=50_000)


@pytest.fixture
def src(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "src"))


def _has_done_file(out: Path) -> bool:
    try:
        return '"done"' in (out / JOURNAL).read_text()
    except OSError:
        return False


def _start_and_freeze(src: Path, out: Path, *extra: str, until=None) -> subprocess.Popen[str]:  # noqa: ANN001
    """A convert that holds the output's lock, frozen (SIGSTOP) before it finishes, once
    ``until(out)`` holds (default: it holds the lock)."""
    until = until or (lambda o: (o / STATE / "owner").exists())
    proc = subprocess.Popen(cli("convert", src, "--out", out, "--workers", "1", "--quiet",
                                *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_default)  # fmt: skip
    while proc.poll() is None and not until(out):
        time.sleep(0.0005)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGSTOP)
    while not _stopped(proc.pid):
        time.sleep(0.001)
    assert not looks_complete(out)
    return proc


# --- 1. exclusive output -----------------------------------------------------------------


@pytest.mark.parametrize("second", [["--layout", "tp-blocked", "--tp", "2"], ["--resume"]])
def test_second_run_on_one_output_is_refused_naming_the_first(
    src: Path, tmp_path: Path, second: list[str]
) -> None:
    out = tmp_path / "out"
    first = _start_and_freeze(src, out)
    try:
        proc = run_cli("convert", src, "--out", out, *second)
        assert proc.returncode == 2, proc.stderr
        line = error_line(proc)
        assert "another gdnfuse run" in line and f"pid {first.pid}" in line, line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(60) == 0, first.communicate()
    report = verify(out, against=src, numeric=False)
    assert report.ok, report.failures


def test_lock_of_a_killed_run_does_not_block_resume(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _start_and_freeze(src, out)
    first.kill()
    first.wait(30)
    assert (out / STATE / "lock").exists()  # left behind, but no process holds it
    proc = run_cli("convert", src, "--out", out, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    ref = convert(src, tmp_path / "ref", **OPTS).out
    assert digests(out) == digests(ref)
    assert not (out / STATE).exists()


def test_runs_use_their_own_temporaries(src: Path, tmp_path: Path) -> None:
    """A second run never removes or reuses another's temporary (they are per run)."""
    from gdnfuse.outdir import tmp_path as temporary

    a = temporary(tmp_path, "x.safetensors", "1-aa")
    b = temporary(tmp_path, "x.safetensors", "2-bb")
    assert a != b and a.parent == b.parent == tmp_path / STATE / "tmp"


# --- 2. --overwrite after an interruption ------------------------------------------------


def _renamed(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose shards have other names (another model's files)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        (dst / shard).rename(dst / f"other-{shard}")
    index["weight_map"] = {k: f"other-{v}" for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_overwrite_after_an_interrupted_run_of_another_source(src: Path, tmp_path: Path) -> None:
    other = _renamed(src, tmp_path / "other")
    out = tmp_path / "out"
    first = _start_and_freeze(other, out)
    while not any(n.startswith("other-") for n in os.listdir(out)):  # some B shard landed
        first.send_signal(signal.SIGCONT)
        time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        while not _stopped(first.pid) and first.poll() is None:
            time.sleep(0.001)
        if first.poll() is not None:
            pytest.skip("the interrupted run finished before one of its shards landed")
    first.kill()
    first.wait(30)
    (out / "my-notes.txt").write_text("mine")  # the user's own file: kept
    proc = run_cli("convert", src, "--out", out, "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    ref = convert(src, tmp_path / "ref", **OPTS).out
    assert sorted(os.listdir(out)) == sorted([*os.listdir(ref), "my-notes.txt"])
    assert verify(out, against=src, numeric=False).ok


def test_overwrite_interrupted_in_its_own_clean_up(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after removing the old manifest but not the files it listed: the next
    --overwrite still knows them (the journal names them before anything is removed)."""
    import gdnfuse.outdir as outdir

    other = _renamed(src, tmp_path / "other")
    out = convert(other, tmp_path / "out", **OPTS).out
    real, removed = outdir.remove_old, []

    def dying(root: Path, name: str) -> None:
        real(root, name)
        removed.append(name)
        if MANIFEST_NAME in removed and len(removed) > 3:
            raise KeyboardInterrupt  # stands for SIGKILL mid-clean-up

    monkeypatch.setattr(outdir, "remove_old", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, workers=1, overwrite=True)
    monkeypatch.setattr(outdir, "remove_old", real)
    assert not (out / MANIFEST_NAME).exists()
    assert any(n.startswith("other-") for n in os.listdir(out))
    convert(src, out, workers=1, overwrite=True)
    ref = convert(src, tmp_path / "ref", **OPTS).out
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


# --- 3. --link across filesystems ---------------------------------------------------------


def test_link_onto_another_filesystem_is_counted_as_a_copy(
    src: Path, tmp_path: Path, small_fs  # noqa: ANN001, F811
) -> None:
    fs = small_fs("2m")
    plan_bytes = sum(p.stat().st_size for p in src.iterdir())
    rewritten = sum(p.stat().st_size for p in convert(src, tmp_path / "probe", **OPTS)
                    .out.iterdir()) - plan_bytes  # fmt: skip
    assert rewritten < plan_bytes
    fill(fs, plan_bytes // 2 + max(rewritten, 0))  # room for less than everything
    proc = run_cli("convert", src, "--out", fs / "out", "--link", "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "not enough free space" in error_line(proc)
    assert "--link" not in error_line(proc)  # it would not help: another filesystem
    assert not (fs / "out").exists()


# --- 4. non-UTF-8 names --------------------------------------------------------------------


def test_non_utf8_side_file_is_carried_over(src: Path, tmp_path: Path) -> None:
    name = os.fsdecode(b"notes-\xe9.txt")
    (src / name).write_bytes(b"latin-1 named notes")
    out = tmp_path / "out"
    for args in (["inspect", src, "--json"], ["convert", src, "--out", out, "--dry-run"],
                 ["convert", src, "--out", out, "--dry-run", "--json"],
                 ["convert", src, "--out", out, "--quiet"]):  # fmt: skip
        proc = run_cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert (out / name).read_bytes() == b"latin-1 named notes"
    assert verify(out, against=src, numeric=False).ok


def test_non_utf8_shard_name_is_refused_in_one_line(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", "tiny", shard_bytes=10**9)  # one shard, no index
    (shard,) = [p for p in src.iterdir() if p.suffix == ".safetensors"]
    (src / "model.safetensors.index.json").unlink(missing_ok=True)
    shard.rename(src / os.fsdecode(b"model-\xe9.safetensors"))
    proc = run_cli("convert", src, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "UTF-8" in error_line(proc)
    assert not (tmp_path / "out").exists()


# --- 5. --resume after the source changed ----------------------------------------------------


def test_resume_refuses_a_changed_source(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _start_and_freeze(src, out, until=_has_done_file)
    first.kill()
    first.wait(30)
    shard = src / sorted(set(weight_map(src).values()))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same header, same size: other bytes
    shard.write_bytes(bytes(data))
    proc = run_cli("convert", src, "--out", out, "--resume")
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "changed since the interrupted run" in line and shard.name in line


# --- 6. non-regular files --------------------------------------------------------------------


def test_fifo_in_the_source_is_skipped_with_a_line(src: Path, tmp_path: Path) -> None:
    os.mkfifo(src / "pipe.txt")
    proc = subprocess.run(cli("convert", src, "--out", tmp_path / "out", "--quiet"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pipe.txt" in proc.stderr and "not a regular file" in proc.stderr
    assert not (tmp_path / "out" / "pipe.txt").exists()


# --- 7. symlinked folders --------------------------------------------------------------------


def test_symlinked_folder_is_followed_and_verified(src: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer").symlink_to(shared)
    out = convert(src, tmp_path / "out", **OPTS).out
    assert (out / "tokenizer" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert verify(out, against=src, numeric=False).ok
    (out / "tokenizer" / "tokenizer.json").unlink()  # verify must notice a missing side file
    report = verify(out, against=src, numeric=False)
    assert not report.ok and any(f.file == "tokenizer/tokenizer.json" for f in report.failures)


def test_symlink_loop_is_refused(src: Path, tmp_path: Path) -> None:
    (src / "loop").symlink_to(src)
    with pytest.raises(GdnfuseError, match="loop"):
        convert(src, tmp_path / "out", **OPTS)
    assert not (tmp_path / "out").exists()


# --- 8. smaller ---------------------------------------------------------------------------------


@pytest.fixture
def bind(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "bound"
    point.mkdir()
    yield point
    subprocess.run(["umount", point], capture_output=True)


def test_out_inside_a_bind_mounted_source_is_refused(src: Path, tmp_path: Path, bind: Path) -> None:
    proc = subprocess.run(["mount", "--bind", src, bind], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot bind-mount here (needs root): {proc.stderr}")
    res = run_cli("convert", bind, "--out", src / "out")
    assert res.returncode == 2 and "separate directory" in error_line(res), res.stderr
    assert not (src / "out").exists()


def test_fsync_syncs_the_directories(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def traced(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", traced)
    out = convert(src, tmp_path / "out", workers=1, fsync=True).out
    assert str(out) in synced  # the directory entry of every rename
    files = [s for s in synced if s != str(out)]
    assert len(files) >= len(os.listdir(out))  # and each file before its rename


def test_layers_select_decoder_layers_and_mtp_separately(tmp_path: Path) -> None:
    from tiny_models import build_checkpoint

    src = build_checkpoint(tmp_path / "src", r=2, mtp=True)
    out = convert(src, tmp_path / "out", **OPTS).out
    zero = verify(out, layers=[0])
    detail = " ".join(c.detail for c in zero.checks if c.name == "numeric.forward")
    assert detail.startswith("1 GDN layers"), detail  # layer 0 only, not mtp.layers.0 too
    mtp = verify(out, layers=["mtp.0"])
    detail = " ".join(c.detail for c in mtp.checks if c.name == "numeric.forward")
    assert detail.startswith("1 GDN layers"), detail
    with pytest.raises(GdnfuseError, match="not a GDN layer"):
        verify(out, layers=["mtp.1"])
    with pytest.raises(GdnfuseError, match="give a list"):
        verify(out, layers="0-1")


def test_layer_types_are_cross_checked_with_the_tensors(src: Path, tmp_path: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config", config)
    kinds = text.get("layer_types") or []
    if not kinds:
        pytest.skip("synthetic config has no layer_types")
    i = kinds.index("linear_attention")
    kinds[i] = "full_attention"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(GdnfuseError, match=f"layer_types.*{i}"):
        convert(src, tmp_path / "out", **OPTS)


def test_gdnfuse_names_inside_a_source_do_not_break_resume_or_verify(
    src: Path, tmp_path: Path
) -> None:
    (src / "weights.gdnfuse-tmp").write_text("a side file, whatever its name")
    (src / MANIFEST_NAME).write_text("{}")  # left by some earlier tool run in the source
    from corrupt import edit_header

    shard = src / sorted(set(weight_map(src).values()))[0]
    edit_header(shard, lambda h: h.setdefault("__metadata__", {}).update({"gdnfuse.layout": "x"}))
    out = convert(src, tmp_path / "out", **OPTS).out
    assert (out / "weights.gdnfuse-tmp").exists()
    report = verify(out, against=src, numeric=False)
    assert report.ok, [f.detail for f in report.failures]


def test_verify_ignores_unindexed_shards_like_convert(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "out", **OPTS).out
    shutil.copy(out / sorted(set(weight_map(out).values()))[0], out / "consolidated.safetensors")
    report = verify(out, against=src, numeric=False)
    assert report.ok, [f.detail for f in report.failures]
    assert any("consolidated.safetensors" in c.detail for c in report.checks)


def test_journal_is_namespaced(src: Path, tmp_path: Path) -> None:
    assert JOURNAL.startswith(STATE + "/")


# --- issue 14: the first hour --------------------------------------------------------------


def test_interrupt_prints_a_resume_command_that_works(src: Path, tmp_path: Path) -> None:
    """Ctrl-C's hint is a full command with the options that matter; pasted, it finishes."""
    import shlex

    out = tmp_path / "out"
    first = _start_and_freeze(src, out, "--tp", "2", "--layout", "tp-blocked",
                              until=_has_done_file)  # fmt: skip
    first.send_signal(signal.SIGINT)
    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 2, stderr
    hint = stderr.strip().split("Finish with: ", 1)[1]
    args = shlex.split(hint)
    assert args[:2] == ["gdnfuse", "convert"] and "--tp" in args and "tp-blocked" in args
    proc = run_cli(*args[1:], "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert verify(out, against=src, numeric=False).ok


def test_resume_says_which_option_differs(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _start_and_freeze(src, out, "--tp", "2", until=_has_done_file)
    first.kill()
    first.wait(30)
    proc = run_cli("convert", src, "--out", out, "--resume", "--tp", "4")
    assert proc.returncode == 2
    assert "--tp 4 but the interrupted run used --tp 2" in error_line(proc)
