"""The Hub flow against a fake Hub on loopback (tests/hub_server.py), no internet.

The CLI runs as a subprocess with ``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_OFFLINE`` in its
environment, because huggingface_hub reads them at import: the real client downloads,
resumes, caches and fails exactly as it would against huggingface.co.

"Equal to a local conversion, byte for byte": the layout record names the source (a path
locally, repo id and sha from the Hub), so the local conversion is given the Hub run's
record (``record_source``); then every output file must be identical, except the
manifest's ``plan_fingerprint``, which hashes the source paths it read from (and so must
differ between a cache snapshot and a local folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest

from gdnfuse import hub as gdnhub
from gdnfuse.convert import MANIFEST_NAME, plan_source, run
from gdnfuse.errors import GdnfuseError, NoSpaceError
from gdnfuse.executor import ExecuteOptions
from gdnfuse.synthetic import PRESETS, write_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402

REPO = "org/tiny"
CHUNK = 10 << 20  # huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
IGNORED = ("pytorch_model.bin", "model.gguf", "original/params.json", "original/consolidated.pth")


# huggingface_hub streams downloads in 10 MiB chunks and resumes from the last whole chunk, so
# the embedding (its own shard) is made just over 10 MiB to give a cut-off download a place
# to resume from; the other shards are tens of KB.
SHAPE = replace(PRESETS["tiny"], vocab=(10 << 20) // 128 + 512)


def _checkpoint(root: Path, seed: int) -> Path:
    src = write_checkpoint(root, SHAPE, shard_bytes=60_000, fast=True, seed=seed)
    for name in IGNORED:  # duplicates a conversion must never download
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes(b"not needed " * 50)
    return src


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("hub") / "src", seed=0)


@pytest.fixture
def fake_hub(src: Path):
    with FakeHub() as h:
        h.add_commit(REPO, src)
        h.add_commit("org/gated", src, gated=True)
        h.add_commit("org/private", src, private=True)
        yield h


def _env(home: Path, hub: FakeHub | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9", **extra)  # fmt: skip
    return env


def gdnfuse(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gdnfuse.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _record(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["gdnfuse"]["source"]


def assert_same_conversion(hub_out: Path, local_out: Path) -> None:
    a, b = _files(hub_out), _files(local_out)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != MANIFEST_NAME:
            assert a[name] == b[name], name
    ma, mb = json.loads(a[MANIFEST_NAME]), json.loads(b[MANIFEST_NAME])
    assert ma.pop("plan_fingerprint") != mb.pop("plan_fingerprint")  # different source paths
    assert ma == mb  # incl. every file's size and sha256


def _local(src: Path, out: Path, record: dict) -> Path:
    run(src, out, ExecuteOptions(checksum=True), record_source=record)
    return out


def _bodies(reqs) -> list:
    """Requests that transferred file bytes (GETs answered 200/206)."""
    return [r for r in reqs if r.file and r.method == "GET" and r.status in (200, 206)]


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_convert_from_hub_resumes_caches_and_works_offline(src, fake_hub, tmp_path):
    """Download+convert equals a local conversion; a dropped connection resumes with a range
    request; a second run downloads nothing; offline with the server stopped converts from the
    cache; ignored duplicates are never requested."""
    biggest = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    cut = CHUNK + 1000
    fake_hub.drop_once[biggest.name] = cut
    env = _env(tmp_path / "hf", fake_hub)

    run = gdnfuse("convert", REPO, "--out", str(tmp_path / "o1"), "--checksum", "--quiet", env=env)
    assert run.returncode == 0, run.stderr
    sha = fake_hub.repos[REPO].refs["main"]
    record = {"repo_id": REPO, "revision": sha, "requested_revision": "main"}
    assert _record(tmp_path / "o1") == record
    assert_same_conversion(tmp_path / "o1", _local(src, tmp_path / "local", record))

    first = fake_hub.requests()
    got = [(r.range, r.status) for r in _bodies(first) if r.file == biggest.name]
    assert got == [(None, 200), (f"bytes={CHUNK}-", 206)]  # cut off, resumed from the last chunk
    assert not {r.file for r in first} & set(IGNORED)
    assert sorted({r.file for r in _bodies(first)}) == sorted(
        p for p in _files(src) if p not in IGNORED)  # fmt: skip

    n = len(first)
    again = gdnfuse("convert", REPO, "--out", str(tmp_path / "o2"), "--checksum", "-q", env=env)
    assert again.returncode == 0, again.stderr
    assert [r for r in fake_hub.requests(n) if r.file] == []  # no HEAD, no GET of any file
    assert _files(tmp_path / "o2") == _files(tmp_path / "o1")

    fake_hub.stop()
    offline = _env(tmp_path / "hf", fake_hub, HF_HUB_OFFLINE="1")
    run = gdnfuse("convert", REPO, "--out", str(tmp_path / "o3"), "--checksum", "-q", env=offline)
    assert run.returncode == 0, run.stderr
    assert _files(tmp_path / "o3") == _files(tmp_path / "o1")
    inspect = gdnfuse("inspect", REPO, "--json", env=offline)
    assert inspect.returncode == 0, inspect.stderr


def test_branch_moving_mid_download_does_not_mix_commits(src, fake_hub, tmp_path):
    other = _checkpoint(tmp_path / "v2", seed=1)
    first_sha = fake_hub.repos[REPO].refs["main"]

    def push_new_commit(req) -> None:  # main moves right after the revision is resolved
        if req.path.startswith(f"/api/models/{REPO}") and "/tree/" not in req.path:
            fake_hub.hooks.clear()
            fake_hub.add_commit(REPO, other)

    fake_hub.hooks.append(push_new_commit)
    run = gdnfuse("convert", REPO, "--out", str(tmp_path / "o"), "--checksum", "-q",
                  env=_env(tmp_path / "hf", fake_hub))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert fake_hub.repos[REPO].refs["main"] != first_sha  # it did move
    record = {"repo_id": REPO, "revision": first_sha, "requested_revision": "main"}
    assert _record(tmp_path / "o") == record
    assert all(first_sha in r.path for r in fake_hub.requests() if r.server == "hub" and r.file)
    assert_same_conversion(tmp_path / "o", _local(src, tmp_path / "local", record))


def test_failed_run_resumes_from_the_cache(src, fake_hub, tmp_path):
    """A run that dies mid-download keeps what it finished; the rerun fetches only the rest."""
    shard = sorted(src.glob("*.safetensors"))[3].name
    fake_hub.fail[shard] = 500
    env = _env(tmp_path / "hf", fake_hub)
    line = _error_line(gdnfuse("convert", REPO, "--out", str(tmp_path / "o"), "-q", env=env))
    assert "500" in line and REPO in line
    fake_hub.fail.clear()
    n = len(fake_hub.requests())
    run = gdnfuse("convert", REPO, "--out", str(tmp_path / "o"), "-q", env=env)
    assert run.returncode == 0, run.stderr
    fetched = [r.file for r in _bodies(fake_hub.requests())]
    assert sorted(fetched) == sorted(set(fetched))  # no file's bytes downloaded twice
    assert shard in [r.file for r in _bodies(fake_hub.requests(n))]


@pytest.mark.parametrize("mode", ["honour", "ignore"])
def test_inspect_reads_only_config_index_and_header_ranges(src, fake_hub, tmp_path, mode):
    fake_hub.range_mode = mode  # "ignore": a 200 with the whole body, as olah answers
    env = _env(tmp_path / "hf", fake_hub)
    run = gdnfuse("inspect", REPO, "--json", env=env)
    assert run.returncode == 0, run.stderr
    record = {"repo_id": REPO, "revision": fake_hub.repos[REPO].refs["main"],
              "requested_revision": "main"}  # fmt: skip
    shown = json.loads(run.stdout)
    assert shown.pop("engines")["vllm"]["outcome"] == "loads"  # the split source
    planned = plan_source(src, record_source=record).summary()
    del planned["engines"], planned["loaded_by"]  # the output's: inspect shows the input's
    assert shown == planned

    reqs = fake_hub.requests()
    assert {r.file for r in reqs if r.file and not r.file.endswith(".safetensors")} == {
        "config.json", "model.safetensors.index.json"}  # fmt: skip
    shards = {p.name: p.stat().st_size for p in src.glob("*.safetensors")}
    reads = [r for r in reqs if r.file in shards and r.method == "GET"]
    assert {r.file for r in reads} == set(shards)
    for r in reads:
        assert r.range == f"bytes=0-{gdnhub.FIRST_READ - 1}", r
        assert r.status in ((302, 206) if mode == "honour" else (302, 200))
        assert shards[r.file] > gdnhub.FIRST_READ  # so a whole-file read would show
    assert not list((tmp_path / "hf").rglob("*.safetensors"))  # no weights in the cache

    if mode == "ignore":
        return
    dry = gdnfuse("convert", REPO, "--out", str(tmp_path / "o"), "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["record"]["source"] == record
    assert not (tmp_path / "o").exists()


def test_inspect_refuses_a_range_it_did_not_ask_for(fake_hub, tmp_path):
    fake_hub.range_mode = "short"
    line = _error_line(gdnfuse("inspect", REPO, env=_env(tmp_path / "hf", fake_hub)))
    assert "Content-Range" in line


def test_gated_and_private_repos_need_a_token_that_never_reaches_the_cdn(fake_hub, tmp_path):
    env = _env(tmp_path / "hf", fake_hub)
    line = _error_line(gdnfuse("convert", "org/gated", "--out", str(tmp_path / "o"), env=env))
    assert "org/gated is gated and no valid token was sent" in line
    assert "--token" in line and "HF_TOKEN" in line and "hf auth login" in line
    assert not (tmp_path / "o").exists()
    line = _error_line(gdnfuse("inspect", "org/gated", env={**env, "HF_TOKEN": "hf_nope"}))
    assert "your token has not been granted access" in line
    line = _error_line(gdnfuse("inspect", "org/private", env=env))
    assert "no repository org/private was found" in line and "--token" in line

    n = len(fake_hub.requests())
    for repo in ("org/gated", "org/private"):
        run = gdnfuse("inspect", repo, "--token", "hf_granted", "--json", env=env)
        assert run.returncode == 0, run.stderr
    reqs = fake_hub.requests(n)
    assert {r.auth for r in reqs if r.server == "hub"} == {"hf_granted"}
    assert {r.auth for r in reqs if r.server == "cdn"} == {None}


Case = namedtuple("Case", "args offline expected")


@pytest.mark.parametrize("case", [
    Case(["inspect", "org/missing"], False,  # a typo'd local path looks like a repo id too
         "no local directory org/missing exists, and no repository org/missing was found on "
         "http://127.0.0.1:"),
    Case(["inspect", REPO, "--revision", "nope"], False,
         "revision 'nope' not found in org/tiny"),
    Case(["convert", REPO, "--out", "OUT"], True,
         "HF_HUB_OFFLINE is set and org/tiny@main is not (completely) in the Hugging Face cache"),
    Case(["inspect", REPO, "--revision", "v1"], True,
         "HF_HUB_OFFLINE is set and org/tiny@v1 is not (completely) in the Hugging Face cache"),
], ids=["repo-not-found", "revision-not-found", "offline-empty-cache",
        "offline-inspect"])  # fmt: skip
def test_hub_errors_are_one_line_exit_2(fake_hub, tmp_path, case):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in case.args]
    env = _env(tmp_path / "hf", fake_hub, **({"HF_HUB_OFFLINE": "1"} if case.offline else {}))
    assert case.expected in _error_line(gdnfuse(*args, env=env))
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_with_nothing_cached(tmp_path):
    line = _error_line(gdnfuse("inspect", REPO, env=_env(tmp_path / "hf", None)))
    assert "cannot reach http://127.0.0.1:9 and org/tiny@main is not (completely) in the cache" in (
        line)  # fmt: skip
    # Issue 14: said once, with the root cause, not huggingface_hub's restatement of it.
    assert line.count("in the cache") == 1 and line.count("cannot reach") == 1, line
    assert "could not be reached" not in line and "Cannot resolve" not in line, line
    assert line.endswith("(ConnectionRefusedError: [Errno 111] Connection refused)"), line


# -- in-process: range reads, selection, disk space ------------------------------------------


def test_range_reads_check_status_and_content_range(src, fake_hub, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    header = raw[: 8 + int.from_bytes(raw[:8], "little")]
    sha = fake_hub.repos[REPO].refs["main"]
    url = f"{fake_hub.url}/{REPO}/resolve/{sha}/{shard.name}"
    for mode in ("honour", "ignore"):
        fake_hub.range_mode = mode
        # first=16 forces a second read at offset 16: with "ignore" that read gets a 200 from
        # byte 0, and only the slice it asked for may come back
        assert gdnhub.read_shard_header(url, len(raw), first=16) == header
        assert gdnhub.read_range(url, 100, 199, len(raw)) == raw[100:200]
    fake_hub.range_mode = "short"
    with pytest.raises(GdnfuseError, match="Content-Range"):
        gdnhub.read_range(url, 100, 199, len(raw))
    fake_hub.range_mode = "honour"
    with pytest.raises(GdnfuseError, match="Content-Range"):  # the file is not the size listed
        gdnhub.read_range(url, 0, 99, len(raw) + 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}" + b" " * 90)
    bad_sha = fake_hub.add_commit("org/bad", bad)
    with pytest.raises(GdnfuseError, match="header length 1000 does not fit a 100-byte shard"):
        gdnhub.read_shard_header(f"{fake_hub.url}/org/bad/resolve/{bad_sha}/model.safetensors", 100)
    with pytest.raises(GdnfuseError, match="too short"):
        gdnhub.read_shard_header(url, 7)


def test_selection_keeps_what_a_conversion_needs():
    paths = ["config.json", "generation_config.json", "model.safetensors.index.json",
             "model-00001-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "README.md",
             "LICENSE", "pytorch_model.bin", "model.gguf", "consolidated.pth", "model.pt",
             "original/params.json", "original/model.safetensors", "sub/original/x.json",
             "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx", ".gitattributes",
             "modeling_x.py"]  # fmt: skip
    assert gdnhub.wanted(paths) == paths[:12]


def test_missing_bytes_and_disk_space(tmp_path):
    pinned = gdnhub.Pinned(REPO, "a" * 40, "main")
    snap = tmp_path / "cache" / "models--org--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    files = [gdnhub.RemoteFile("config.json", 2), gdnhub.RemoteFile("a.safetensors", 1000)]
    assert gdnhub.missing_bytes(pinned, files, tmp_path / "cache") == 1000

    def free(n: int):
        return lambda path: shutil._ntuple_diskusage(10**12, 10**12 - n, n)

    out = tmp_path / "new" / "out"  # not created yet: its nearest existing parent decides
    gdnhub.check_disk_space(1000, 3000, tmp_path / "cache", out, disk_usage=free(4000))
    with pytest.raises(NoSpaceError, match="not enough free space: 0.00 GB to download") as e:
        gdnhub.check_disk_space(1000, 3000, tmp_path / "cache", out, disk_usage=free(3999))
    assert "only 0.00 GB are free" in str(e.value)
    assert (e.value.needed, e.value.free) == (4000, 3999)  # the same class as convert's check
