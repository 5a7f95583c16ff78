"""``convert ORG/NAME --overlap``: download and conversion at once, against the fake Hub.

The overlapped run must be indistinguishable from download-then-convert: the same output
bytes (manifest and its plan fingerprint included, so ``--resume`` works across the two), the
same cache (a later run of either kind downloads nothing), the same one-line errors; and it
must really overlap (an output file is finished while a source is still downloading).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import test_hub
from corrupt import sigint_default
from test_hub import (
    IGNORED,
    REPO,
    _bodies,
    _env,
    _error_line,
    _files,
    _local,
    _record,
    assert_same_conversion,
    gdnfuse,
)

from gdnfuse.convert import MANIFEST_NAME
from gdnfuse.hub import read_order
from gdnfuse.plan import Extent, OutputFile, Plan

src, fake_hub = test_hub.src, test_hub.fake_hub  # the same fixtures
LAST = ("config.json", "model.safetensors.index.json", MANIFEST_NAME)


def _cache(home: Path) -> dict[str, str]:
    """The cache's layout: every snapshot entry with its blob, every blob with its size."""
    hub = home / "hub"
    out = {}
    for p in sorted(hub.rglob("*")):
        rel = p.relative_to(hub).as_posix()
        if ".locks" in rel or p.is_dir() and not p.is_symlink():
            continue
        out[rel] = str(p.readlink()) if p.is_symlink() else str(p.stat().st_size)
    return out


def _shards(root: Path) -> list[str]:
    """Shard names, largest first: the order --overlap needs them in."""
    return [p.name for p in sorted(root.glob("*.safetensors"), key=lambda p: -p.stat().st_size)]


def test_overlap_equals_download_then_convert_and_a_local_conversion(src, fake_hub, tmp_path):
    env = _env(tmp_path / "hf", fake_hub)  # one cache path: the plan names its files
    plain = gdnfuse("convert", REPO, "--out", str(tmp_path / "plain"), "--checksum", "-q",
                    env=env)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    (tmp_path / "hf").rename(tmp_path / "hf-plain")  # keep it to compare; start afresh
    n = len(fake_hub.requests())
    ovl = gdnfuse("convert", REPO, "--out", str(tmp_path / "ovl"), "--checksum", "-q",
                  "--overlap", env=env)  # fmt: skip
    assert ovl.returncode == 0, ovl.stderr

    # byte for byte, manifest (with its plan fingerprint) included
    assert _files(tmp_path / "ovl") == _files(tmp_path / "plain")
    assert_same_conversion(tmp_path / "ovl", _local(src, tmp_path / "local", _record(
        tmp_path / "ovl")))  # fmt: skip
    # the same cache: snapshot links to the same blobs of the same sizes
    assert _cache(tmp_path / "hf") == _cache(tmp_path / "hf-plain")

    reqs = fake_hub.requests(n)
    assert not {r.file for r in reqs} & set(IGNORED)
    fetched = [r.file for r in _bodies(reqs) if not r.range or not r.range.startswith("bytes=0-")]
    assert sorted(fetched) == sorted(p for p in _files(src) if p not in IGNORED)  # each once

    for extra in ([], ["--overlap"]):  # a second run of either kind downloads nothing
        n = len(fake_hub.requests())
        out = tmp_path / f"again{len(extra)}"
        run = gdnfuse("convert", REPO, "--out", str(out), "--checksum", "-q", *extra, env=env)
        assert run.returncode == 0, run.stderr
        assert [r for r in fake_hub.requests(n) if r.file] == []
        assert _files(out) == _files(tmp_path / "plain")


def test_overlap_writes_files_while_a_source_is_still_downloading(src, fake_hub, tmp_path):
    first, last = _shards(src)[0], _shards(src)[-1]
    fake_hub.hold[last] = threading.Event()
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "gdnfuse.cli", "convert", REPO, "--out", str(out), "-q",
           "--overlap"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(tmp_path / "hf", fake_hub), stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_default)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (out / first).is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / first).is_file()  # written while `last` has not been sent
        assert not any((out / name).exists() for name in LAST)
        assert proc.poll() is None
    finally:
        fake_hub.hold[last].set()
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert (out / first).read_bytes() == (src / first).read_bytes()  # an untouched shard


def test_overlap_download_failure_leaves_nothing_complete_and_resumes(src, fake_hub, tmp_path):
    shard = _shards(src)[-2]

    def arm(req) -> None:  # fail its download once the downloads (not header reads) began
        if req.server == "cdn" and req.method == "GET" and req.range is None:
            fake_hub.hooks.clear()
            fake_hub.fail[shard] = 500

    fake_hub.hooks.append(arm)
    env = _env(tmp_path / "hf", fake_hub)
    out = tmp_path / "o"
    line = _error_line(gdnfuse("convert", REPO, "--out", str(out), "-q", "--checksum",
                               "--overlap", env=env))  # fmt: skip
    assert "500" in line and REPO in line
    assert out.is_dir()
    assert not any((out / name).exists() for name in LAST)
    assert not list(out.rglob("*.gdnfuse-tmp"))

    fake_hub.fail.clear()  # the plain run finishes the overlapped one: same plan, same journal
    run = gdnfuse("convert", REPO, "--out", str(out), "-q", "--checksum", "--resume", env=env)
    assert run.returncode == 0, run.stderr
    assert_same_conversion(out, _local(src, tmp_path / "local", _record(out)))


def test_ctrl_c_stops_the_downloads(src, fake_hub, tmp_path):
    fake_hub.bandwidth = 1e6  # ~11 s for the whole selection
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "gdnfuse.cli", "convert", REPO, "--out", str(out), "-q",
           "--overlap"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(tmp_path / "hf", fake_hub), stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_default)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(  # a shard download (not a header read) began
        r.server == "cdn" and r.range is None for r in fake_hub.requests()
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - stopped < 5, "waited for the downloads"
    assert proc.returncode == 2
    assert [ln for ln in stderr.splitlines() if ln.startswith("error:")] == [
        f"error: interrupted; nothing in the output looks complete. Finish with: gdnfuse convert "
        f"{REPO} --out {out} --resume"]  # fmt: skip
    assert not any((out / name).exists() for name in LAST)
    n = len(fake_hub.requests())
    time.sleep(0.5)
    assert [r for r in fake_hub.requests(n) if r.file] == []  # nothing new started


def test_read_order_follows_the_executor():
    """Largest output file first, its sources in extent order, then the ``last`` files."""
    plan = Plan((
        OutputFile("config.json", b"{}", (Extent("c", 0, 1),), last=True),
        OutputFile("small", extents=(Extent("s", 0, 10),), whole_source="s"),
        OutputFile("big", b"h", (Extent("b2", 0, 50), Extent("b1", 0, 50), Extent("s", 0, 5))),
        OutputFile("mid", extents=(Extent("m", 0, 20),)),
    ))  # fmt: skip
    assert read_order(plan) == ["b2", "b1", "s", "m", "c"]


@pytest.mark.parametrize("which", ["old", "outside"])
def test_relocate_moves_every_source(src, tmp_path, which):
    from gdnfuse.convert import plan_source, relocate
    from gdnfuse.errors import GdnfuseError

    cplan = plan_source(src)
    if which == "outside":
        with pytest.raises(GdnfuseError, match="outside the source"):
            relocate(cplan, src / "sub", tmp_path)
        return
    moved = relocate(cplan, src, tmp_path / "snap")
    paths = {s for f in moved.plan.files for s in (f.whole_source, *(e.source for e in f.extents))}
    assert paths - {None}
    assert all(p.startswith(str(tmp_path / "snap") + "/") for p in paths - {None})
    assert [f.size for f in moved.plan.files] == [f.size for f in cplan.plan.files]
