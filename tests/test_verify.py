"""``gdnfuse verify`` passes a good conversion and fails, naming the tensor, on planted faults.

Each fault is planted in the bytes or headers of a good conversion of a tiny synthetic
checkpoint (nk=4, r=3, BF16, 15 shards, fused tensors assembled across shards). The tests
that run without ``--against`` plant exactly the faults the numeric check can see on its own
(non-finite weights, a consumer TP the record cannot serve) and pin down the one it cannot
(a head moved before fusion).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from gdnfuse.checkpoint import INDEX_NAME
from gdnfuse.cli import app
from gdnfuse.convert import MANIFEST_NAME, convert
from gdnfuse.errors import GdnfuseError
from gdnfuse.record import RECORD_KEY
from gdnfuse.safetensors_file import encode_header, read_header
from gdnfuse.synthetic import write_checkpoint
from gdnfuse.verify import verify
from gdnfuse.verify.exact import Reader, first_difference

P = "model.language_model."
LA1 = f"{P}layers.1.linear_attn."
QKVZ1, BA1 = f"{LA1}in_proj_qkvz.weight", f"{LA1}in_proj_ba.weight"
NK, R, DK, DV = 4, 3, 16, 16  # the "tiny" preset
GROUP_ROWS = 2 * DK + 2 * R * DV
RUNNER = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source, qwen3-next tp 1, tp-blocked tp 2, and qwen3-next with sha256 in the manifest."""
    root = tmp_path_factory.mktemp("verify")
    src = write_checkpoint(root / "src", "tiny", shard_bytes=50_000, dtype="BF16")
    out = {"src": src}
    for key, layout, tp, checksum in [
        ("q", "qwen3-next", 1, False),
        ("tb", "tp-blocked", 2, False),
        ("qsum", "qwen3-next", 1, True),
    ]:
        convert(
            src,
            root / key,
            layout=layout,
            tp=tp,
            workers=1, checksum=checksum,
        )
        out[key] = root / key
    return out


@pytest.fixture()
def copy(made: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of one conversion, to plant a fault in."""

    def make(key: str) -> Path:
        return Path(shutil.copytree(made[key], tmp_path / key))

    return make


def run(*args: Any) -> tuple[int, str, str]:
    result = RUNNER.invoke(app, ["verify", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def report_json(*args: Any, tmp: Path) -> tuple[int, dict[str, Any]]:
    path = tmp / "report.json"
    code, _, _ = run(*args, "--report", path)
    return code, json.loads(path.read_text())


def failures(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["checks"] if c["status"] == "FAIL"]


def named(report: dict[str, Any], check: str, tensor: str) -> dict[str, Any]:
    """The failure of ``check`` naming ``tensor`` (the test fails if there is none)."""
    hits = [c for c in failures(report) if c["name"] == check and c["tensor"] == tensor]
    assert hits, f"no {check} failure names {tensor}: {failures(report)}"
    return hits[0]


# --- planting faults ------------------------------------------------------------------------


def shard_of(root: Path, tensor: str) -> Path:
    return root / json.loads((root / INDEX_NAME).read_text())["weight_map"][tensor]


def locate(root: Path, tensor: str) -> tuple[Path, int, int]:
    """File, absolute offset and row size of a tensor."""
    path = shard_of(root, tensor)
    header = read_header(path)
    info = header.by_name[tensor]
    return path, header.data_start + info.begin, info.row_bytes


def swap_rows(root: Path, tensor: str, a: int, b: int, count: int) -> None:
    """Swap rows ``a..a+count`` and ``b..b+count`` of a tensor, in place."""
    path, start, row = locate(root, tensor)
    with open(path, "r+b") as f:
        f.seek(start + a * row)
        x = f.read(count * row)
        f.seek(start + b * row)
        y = f.read(count * row)
        f.seek(start + a * row)
        f.write(y)
        f.seek(start + b * row)
        f.write(x)


def poke(root: Path, tensor: str, byte: int, value: bytes | None = None) -> None:
    """Overwrite (or, with no value, invert) bytes of a tensor at a byte offset."""
    path, start, _ = locate(root, tensor)
    with open(path, "r+b") as f:
        f.seek(start + byte)
        old = f.read(1)
        f.seek(start + byte)
        f.write(value if value is not None else bytes([old[0] ^ 0xFF]))


def rewrite_shard(path: Path, edit: Callable[[list[list[Any]], dict[str, str]], None]) -> None:
    """Re-encode a shard after ``edit(entries, metadata)``; entry: [name, dtype, shape, data]."""
    header = read_header(path)
    blob = path.read_bytes()
    entries = [
        [t.name, t.dtype, t.shape, blob[header.data_start + t.begin : header.data_start + t.end]]
        for t in header.tensors
    ]
    metadata = dict(header.metadata or {})
    edit(entries, metadata)
    raw = encode_header([(n, d, s, len(b)) for n, d, s, b in entries], metadata)
    path.write_bytes(raw + b"".join(e[3] for e in entries))


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


def resync_manifest(root: Path) -> None:
    """Make the manifest agree with the files, as a tool writing consistent lies would."""

    def edit(m: dict[str, Any]) -> None:
        for name, entry in m["files"].items():
            entry["size"] = (root / name).stat().st_size
        m["record"] = json.loads((root / "config.json").read_text())[RECORD_KEY]

    edit_json(root / MANIFEST_NAME, edit)


def set_record(root: Path, layout: str, tp: int) -> None:
    """A self-consistent but wrong record: config.json, every shard's metadata, the manifest."""

    def config(c: dict[str, Any]) -> None:
        c[RECORD_KEY].update(layout=layout, tp=tp)

    def meta(entries: list[list[Any]], metadata: dict[str, str]) -> None:
        metadata.update({f"{RECORD_KEY}.layout": layout, f"{RECORD_KEY}.tp": str(tp)})

    edit_json(root / "config.json", config)
    for shard in root.glob("*.safetensors"):
        if f"{RECORD_KEY}.layout" in (read_header(shard).metadata or {}):
            rewrite_shard(shard, meta)
    resync_manifest(root)


# --- clean conversions pass -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["q", "tb"])
@pytest.mark.parametrize("against", [True, False])
def test_clean_conversion_passes(
    made: dict[str, Path], tmp_path: Path, key: str, against: bool
) -> None:
    extra = ["--against", made["src"]] if against else []
    junit = tmp_path / "report.xml"
    code, report = report_json(made[key], *extra, "--junit", junit, tmp=tmp_path)
    assert code == 0, failures(report)
    assert (
        report["ok"] and report["record"]["layout"] == {"q": "qwen3-next", "tb": "tp-blocked"}[key]
    )
    names = {c["name"] for c in report["checks"]}
    assert {
        "structure.header",
        "structure.index",
        "structure.record",
        "structure.fused_shapes",
        "numeric.forward",
    } <= names
    assert ({"exact.fused", "exact.tensors"} <= names) == against
    forward = next(c for c in report["checks"] if c["name"] == "numeric.forward")
    assert "3 GDN layers" in forward["detail"]
    assert ("not a bad source mapping" in forward["detail"]) != against
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    assert int(suite.get("tests", "0")) == len(report["checks"])


def test_manifest_hashes_checked(made: dict[str, Path], tmp_path: Path) -> None:
    code, report = report_json(made["qsum"], tmp=tmp_path)
    assert code == 0
    assert "sha256 hashes match" in next(
        c["detail"] for c in report["checks"] if c["name"] == "structure.manifest"
    )


# --- planted faults ---------------------------------------------------------------------------


def test_qkvz_key_head_groups_swapped(
    made: dict[str, Path], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    out = copy("q")
    swap_rows(out, QKVZ1, 0, GROUP_ROWS, GROUP_ROWS)
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    exact = named(report, "exact.fused", QKVZ1)
    assert f"{LA1}in_proj_qkv.weight rows 0..15" in exact["detail"]
    # The numeric check sees it on its own, as a wrong layer output.
    assert "max |diff|" in named(report, "numeric.forward", QKVZ1)["detail"]
    assert {c["name"] for c in failures(report)} == {"exact.fused", "numeric.forward"}


@pytest.mark.parametrize("widen", [1, 7 * 8 * 64])
def test_numeric_check_reads_weights_in_row_chunks(
    made: dict[str, Path],
    copy: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    widen: int,
) -> None:
    """No projection is ever read whole (memory stays bounded at any model size), and the
    chunked forward still passes a good output and fails a bad one, with or without source."""
    numeric = importlib.import_module("gdnfuse.verify.numeric")
    monkeypatch.setattr(numeric, "WIDEN", widen)  # bytes of float64: 1 row, or 7 of 64 columns
    monkeypatch.setattr(numeric, "READ", 1)  # one chunk per read
    widest: dict[str, tuple[int, int]] = {}
    real = numeric.Weights._stored

    def stored(self: Any, name: str, start: int, stop: int) -> Any:
        cols = math.prod(self.tensors[name].info.shape[1:])
        widest[name] = max(widest.get(name, (0, cols)), (stop - start, cols))
        return real(self, name, start, stop)

    monkeypatch.setattr(numeric.Weights, "_stored", stored)
    for key in ("q", "tb"):
        assert verify(made[key], against=made["src"]).ok
        assert verify(made[key]).ok
    projections = {n: w for n, w in widest.items() if "proj" in n}
    step = {n: max(1, widen // (8 * cols)) for n, (_, cols) in projections.items()}
    assert projections and all(rows <= step[n] for n, (rows, _) in projections.items())
    assert any(rows == step[n] > 1 or widen == 1 for n, (rows, _) in projections.items())
    out = copy("q")
    swap_rows(out, QKVZ1, 0, GROUP_ROWS, GROUP_ROWS)
    bad = verify(out, against=made["src"])
    assert ("numeric.forward", QKVZ1) in {(c.name, c.tensor) for c in bad.checks if not c.ok}


def test_moved_head_not_visible_without_source(copy: Callable[[str], Path]) -> None:
    """The limit stated in the report: a moved head is consistent with any record."""
    out = copy("q")
    swap_rows(out, QKVZ1, 0, GROUP_ROWS, GROUP_ROWS)
    report = verify(out)
    assert report.ok
    forward = next(c for c in report.checks if c.name == "numeric.forward")
    assert "not a bad source mapping" in forward.detail


def test_b_and_a_swapped_in_one_group(
    made: dict[str, Path], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    out = copy("q")
    group = 2
    swap_rows(out, BA1, group * 2 * R, group * 2 * R + R, R)
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    detail = named(report, "exact.fused", BA1)["detail"]
    assert f"fused rows 12..14 should be {LA1}in_proj_b.weight rows 6..8" in detail
    named(report, "numeric.forward", QKVZ1)  # the layer is named by its qkvz tensor


@pytest.mark.parametrize(
    "key, record, data",
    [
        ("q", ("tp-blocked", 1), "layout qwen3-next"),
        ("tb", ("qwen3-next", 2), "layout tp-blocked, tp 2"),
    ],
)
def test_layout_record_contradicts_data(
    made: dict[str, Path],
    copy: Callable[[str], Path],
    tmp_path: Path,
    key: str,
    record: tuple[str, int],
    data: str,
) -> None:
    out = copy(key)
    set_record(out, *record)
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    for tensor in (QKVZ1, BA1):
        detail = named(report, "exact.fused", tensor)["detail"]
        assert f"its bytes are {data}: the layout record is wrong" in detail
    named(report, "numeric.forward", QKVZ1)
    assert not any(c["name"].startswith("structure.") for c in failures(report))


def test_byte_flipped_in_untouched_tensor(
    made: dict[str, Path], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    out = copy("q")
    poke(out, "lm_head.weight", 1001)
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    assert "at byte 1001 " in named(report, "exact.tensors", "lm_head.weight")["detail"]
    assert len(failures(report)) == 1


def test_byte_flip_caught_by_manifest_hash(copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = copy("qsum")
    poke(out, "lm_head.weight", 7)
    code, report = report_json(out, "--no-numeric", tmp=tmp_path)
    assert code == 1
    [fail] = failures(report)
    assert (
        fail["name"] == "structure.manifest"
        and fail["file"] == shard_of(out, "lm_head.weight").name
    )


def test_tensor_dropped_from_shard_but_indexed(
    made: dict[str, Path], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    out = copy("q")
    tensor = f"{LA1}A_log"
    rewrite_shard(
        shard_of(out, tensor),
        lambda e, m: e.__delitem__(next(i for i, x in enumerate(e) if x[0] == tensor)),
    )
    resync_manifest(out)
    code, report = report_json(out, tmp=tmp_path)
    assert code == 1
    assert "no shard has it" in named(report, "structure.index", tensor)["detail"]
    named(report, "numeric.forward", tensor)  # the layer cannot run without it
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    named(report, "exact.tensors", tensor)


def test_shard_truncated(
    made: dict[str, Path], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    out = copy("q")
    path = shard_of(out, "lm_head.weight")  # the last tensor of the last shard
    path.write_bytes(path.read_bytes()[:-10])
    code, report = report_json(out, tmp=tmp_path)
    assert code == 1
    assert "truncated" in named(report, "structure.header", "lm_head.weight")["detail"]
    assert any(
        c["name"] == "structure.manifest" and c["file"] == path.name for c in failures(report)
    )
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    named(report, "exact.tensors", "lm_head.weight")


def test_index_points_to_wrong_shard(copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = copy("q")
    right = shard_of(out, "lm_head.weight").name
    wrong = next(p.name for p in sorted(out.glob("*.safetensors")) if p.name != right)
    edit_json(out / INDEX_NAME, lambda i: i["weight_map"].update({"lm_head.weight": wrong}))
    code, report = report_json(out, tmp=tmp_path)
    assert code == 1
    detail = named(report, "structure.index", "lm_head.weight")["detail"]
    assert detail == f"index maps tensor to {wrong} but it is in {right}"
    assert {c["name"] for c in failures(report)} == {"structure.index"}


def test_split_key_left_behind(
    made: dict[str, Path], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    out = copy("q")
    tensor = f"{LA1}in_proj_z.weight"
    path, start, row = locate(made["src"], tensor)
    data = path.read_bytes()[start : start + R * NK * DV * row]
    host = shard_of(out, QKVZ1)
    rewrite_shard(host, lambda e, m: e.append([tensor, "BF16", (NK * R * DV, 64), data]))

    def index(i: dict[str, Any]) -> None:
        i["weight_map"][tensor] = host.name
        i["metadata"]["total_size"] += len(data)

    edit_json(out / INDEX_NAME, index)
    resync_manifest(out)
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    named(report, "structure.split_keys", tensor)
    assert {c["name"] for c in failures(report)} == {"structure.split_keys"}


def _dup_index(out: Path) -> str:
    text = (out / INDEX_NAME).read_text()
    line = next(x for x in text.splitlines() if '"lm_head.weight"' in x)
    (out / INDEX_NAME).write_text(text.replace(line, line.rstrip(",") + ",\n" + line, 1))
    return "lm_head.weight"


def _short_qkvz(out: Path) -> str:
    """qkvz loses its last key-head group (header, data, index and manifest kept consistent)."""
    host = shard_of(out, QKVZ1)
    cut = GROUP_ROWS * 64 * 2

    def edit(entries: list[list[Any]], metadata: dict[str, str]) -> None:
        entry = next(e for e in entries if e[0] == QKVZ1)
        entry[2], entry[3] = (entry[2][0] - GROUP_ROWS, 64), entry[3][:-cut]

    rewrite_shard(host, edit)
    edit_json(
        out / INDEX_NAME,
        lambda i: i["metadata"].update(total_size=i["metadata"]["total_size"] - cut),
    )
    resync_manifest(out)
    return QKVZ1


@pytest.mark.parametrize(
    "check, plant, where",
    [
        (
            "structure.total_size",
            lambda out: edit_json(out / INDEX_NAME, lambda i: i["metadata"].update(total_size=1)),
            None,
        ),
        ("structure.index", _dup_index, "lm_head.weight"),
        ("structure.fused_shapes", _short_qkvz, QKVZ1),
        (
            "exact.config",
            lambda out: edit_json(
                out / "config.json", lambda c: c["text_config"].update(vocab_size=7)
            ),
            None,
        ),
        ("exact.side_files", lambda out: (out / "tokenizer.json").write_text("{}"), None),
    ],
)
def test_other_checks_catch_their_fault(
    made: dict[str, Path],
    copy: Callable[[str], Path],
    tmp_path: Path,
    check: str,
    plant: Any,
    where: str | None,
) -> None:
    out = copy("q")
    plant(out)
    code, report = report_json(out, "--against", made["src"], tmp=tmp_path)
    assert code == 1
    hits = [c for c in failures(report) if c["name"] == check]
    assert hits, failures(report)
    if where is not None:
        assert any(c["tensor"] == where for c in hits)


def test_record_missing(copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = copy("q")
    edit_json(out / "config.json", lambda c: c.pop(RECORD_KEY))
    code, report = report_json(out, tmp=tmp_path)
    assert code == 1
    names = {c["name"] for c in failures(report)}
    assert {"structure.record", "numeric.forward"} <= names


def test_shard_metadata_disagrees_with_record(copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = copy("q")
    host = shard_of(out, QKVZ1)
    rewrite_shard(host, lambda e, m: m.update({f"{RECORD_KEY}.layout": "tp-blocked"}))
    resync_manifest(out)
    code, report = report_json(out, "--no-numeric", tmp=tmp_path)
    assert code == 1
    [fail] = failures(report)
    assert fail["name"] == "structure.record" and fail["file"] == host.name
    assert fail["tensor"] == QKVZ1


# --- faults the numeric check catches without a source ------------------------------------------


def test_non_finite_weight_fails_numeric_alone(copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = copy("q")
    poke(out, QKVZ1, 2 * 5 * 64, b"\xc0")  # element (5, 0): low byte 0xc0 ...
    poke(out, QKVZ1, 2 * 5 * 64 + 1, b"\x7f")  # ... high byte 0x7f: bf16 NaN
    code, report = report_json(out, tmp=tmp_path)
    assert code == 1
    [fail] = failures(report)
    assert fail["name"] == "numeric.forward" and fail["tensor"] == QKVZ1
    assert "non-finite" in fail["detail"]
    # --layers runs only the selected layers.
    assert run(out, "--layers", "0,2")[0] == 0
    assert run(out, "--layers", "1")[0] == 1


def test_consumer_tp_the_record_cannot_serve(made: dict[str, Path], tmp_path: Path) -> None:
    code, report = report_json(made["tb"], "--tp", 4, tmp=tmp_path)
    assert code == 1
    tp_fail = next(c for c in failures(report) if c["name"] == "numeric.tp")
    assert "tp-blocked for tp 2" in tp_fail["detail"]
    # The forward run as a tp 4 consumer really computes a different layer output.
    forward = [c for c in failures(report) if c["name"] == "numeric.forward"]
    assert len(forward) == 3 and all("max |diff|" in c["detail"] for c in forward)
    # qwen3-next is TP-invariant: any tp dividing nk works.
    for tp in (2, 4):
        assert run(made["q"], "--tp", tp)[0] == 0


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("no-config", "no config.json"),
        ("bad-tp", "does not divide"),
        ("bad-layers", "not a GDN layer"),
        ("bad-against", "does not exist"),
        ("against-fused", "already fused"),
    ],
)
def test_bad_input_exits_2(made: dict[str, Path], tmp_path: Path, case: str, message: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "missing": [tmp_path / "nope"],
        "no-config": [empty],
        "bad-tp": [made["q"], "--tp", 3],
        "bad-layers": [made["q"], "--layers", "3"],  # layer 3 is full attention
        "bad-against": [made["q"], "--against", tmp_path / "nope"],
        "against-fused": [made["q"], "--against", made["tb"]],
    }[case]
    code, stdout, stderr = run(*args)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
    assert stdout == ""


# --- reports and the streaming comparison -------------------------------------------------------


def test_failed_report_formats(
    made: dict[str, Path], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    out = copy("q")
    poke(out, "lm_head.weight", 0)
    junit = tmp_path / "r.xml"
    code, stdout, _ = run(out, "--against", made["src"], "--junit", junit)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    failing = [case for case in suite.iter("testcase") if case.find("failure") is not None]
    assert code == 1 and [c.get("name") for c in failing] == [
        f"exact.tensors {shard_of(out, 'lm_head.weight').name} : lm_head.weight"
    ]
    assert "FAIL" in stdout and "lm_head.weight" in stdout


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "page-cache"])
def test_first_difference_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Chunks, pieces shared by workers, unaligned offsets under direct I/O, short files."""
    exact = importlib.import_module("gdnfuse.verify.exact")
    monkeypatch.setattr(exact, "CHUNK", 1000)
    monkeypatch.setattr(exact, "PIECE", 3000)
    monkeypatch.setattr(exact, "DIRECT", direct)
    monkeypatch.setattr(exact, "DIRECT_MIN", 0)  # every read direct (when direct)
    a, b = tmp_path / "a", tmp_path / "b"
    data = bytes(range(256)) * 40
    a.write_bytes(b"xx" + data)
    for at in (0, 999, 1000, 2999, 3000, 5000, 10239):
        changed = bytearray(data)
        changed[at] ^= 1
        b.write_bytes(bytes(changed))
        with Reader() as r:
            assert first_difference(r, (a, 2), (b, 0), len(data)) == at
            assert first_difference(r, (a, 2), (b, 0), at) is None
            assert r.first_differences([((a, 2), (b, 0), at), ((a, 2), (b, 0), len(data))]) == [
                None, at]  # fmt: skip
    b.write_bytes(data[:-3])  # a file that ends early differs where it ends
    with Reader() as r:
        assert first_difference(r, (a, 2), (b, 0), len(data)) == len(data) - 3
        assert r.fd(str(a), True)[1] is (direct and _takes_direct_io(a))  # the mode ran


def _takes_direct_io(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_hard_linked_ranges_are_not_read(tmp_path: Path) -> None:
    """Same file, same offset: identical by construction (a --link output's shards)."""
    a = tmp_path / "a"
    a.write_bytes(bytes(range(256)) * 64)
    os.link(a, tmp_path / "b")
    read: list[int] = []
    with Reader(read.append) as r:
        assert first_difference(r, (a, 0), (tmp_path / "b", 0), a.stat().st_size) is None
        assert r.linked == a.stat().st_size and read == [a.stat().st_size]
        assert first_difference(r, (a, 0), (tmp_path / "b", 1), 100) == 0  # other offset: read
        assert r.linked == a.stat().st_size


# --- FP8 ----------------------------------------------------------------------------------------


def write_fp8(root: Path) -> Path:
    """One GDN layer, fp8 in_proj_qkv/z/out_proj with 16x16 block scales (H=36: partial blocks)."""
    nk, nv, dk, dv, h, block = 4, 8, 16, 16, 36, 16
    g = torch.Generator().manual_seed(1)
    la = f"{P}layers.0.linear_attn."
    qkv_rows = 2 * nk * dk + nv * dv
    t: dict[str, torch.Tensor] = {}

    def fp8(name: str, rows: int, cols: int) -> None:
        t[f"{name}.weight"] = (torch.randn(rows, cols, generator=g) * 3).to(torch.float8_e4m3fn)
        scale = torch.rand(math.ceil(rows / block), math.ceil(cols / block), generator=g)
        t[f"{name}.weight_scale_inv"] = ((scale + 0.5) * 0.02).to(torch.bfloat16)

    def bf16(name: str, *shape: int, positive: bool = False) -> None:
        x = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        t[name] = (x * (1 if positive else 0.1)).to(torch.bfloat16)

    fp8(la + "in_proj_qkv", qkv_rows, h)
    first = dict(t)
    fp8(la + "in_proj_z", nv * dv, h)
    bf16(la + "in_proj_b.weight", nv, h)
    bf16(la + "in_proj_a.weight", nv, h)
    bf16(la + "conv1d.weight", qkv_rows, 1, 4)
    bf16(la + "A_log", nv, positive=True)
    bf16(la + "dt_bias", nv, positive=True)
    bf16(la + "norm.weight", dv, positive=True)
    fp8(la + "out_proj", h, nv * dv)
    second = {k: v for k, v in t.items() if k not in first}
    root.mkdir()
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for name, tensors in shards.items():
        save_file(tensors, str(root / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(x.nbytes for x in t.values())},
        "weight_map": {k: n for n, ts in shards.items() for k in ts},
    }
    (root / INDEX_NAME).write_text(json.dumps(index))
    config = {
        "model_type": "qwen3_5_text",
        "hidden_size": h,
        "linear_num_key_heads": nk,
        "linear_num_value_heads": nv,
        "linear_key_head_dim": dk,
        "linear_value_head_dim": dv,
        "rms_norm_eps": 1e-6,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [block, block],
            "modules_to_not_convert": [la + "in_proj_b", la + "in_proj_a"],
        },
    }
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("widen", [5 * 36 * 8, None], ids=["5-row-chunks", "default-chunks"])
def test_fp8_block_scales(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, widen: int | None
) -> None:
    if widen is not None:  # chunks of 5 rows round up to whole 16-row scale blocks
        numeric = importlib.import_module("gdnfuse.verify.numeric")
        monkeypatch.setattr(numeric, "WIDEN", widen)
        monkeypatch.setattr(numeric, "READ", 1)
    src = write_fp8(tmp_path / "src")
    out = tmp_path / "out"
    convert(src, out, layout="tp-blocked", tp=2, workers=1)
    report = verify(out, against=src)
    assert report.ok, [c for c in report.checks if not c.ok]
    scale = f"{P}layers.0.linear_attn.in_proj_qkvz.weight_scale_inv"
    # Swap the scale rows of q head 0 and k head 0 (one 16-row block each).
    swap_rows(out, scale, 0, 2, 1)
    report = verify(out, against=src)
    names = {(c.name, c.tensor) for c in report.checks if not c.ok}
    assert ("exact.fused", scale) in names
    assert ("numeric.forward", f"{P}layers.0.linear_attn.in_proj_qkvz.weight") in names


def test_fp8_scales_that_do_not_cover_the_weight_are_named(tmp_path: Path) -> None:
    """The numeric check reads FP8 weights in chunks; a scale grid of the wrong shape is
    refused for the whole weight before any chunk is dequantized."""
    from gdnfuse.checkpoint import open_checkpoint

    numeric = importlib.import_module("gdnfuse.verify.numeric")
    src = open_checkpoint(write_fp8(tmp_path / "src"))
    name = f"{P}layers.0.linear_attn.in_proj_qkv.weight"
    good = numeric.Weights(src.root, src.shards, src.tensors, (16, 16), "cpu")
    assert good.load(name).dtype == torch.float64
    scale = src.tensors[f"{name}_scale_inv"]
    rows, cols = scale.info.shape
    short = {**src.tensors, f"{name}_scale_inv": scale._replace(
        info=scale.info._replace(shape=(rows - 1, cols)))}  # fmt: skip
    bad = numeric.Weights(src.root, src.shards, short, (16, 16), "cpu")
    with pytest.raises(GdnfuseError, match=r"scale shape .* does not cover weight") as e:
        bad.project(torch.zeros(1, 2, bad.tensors[name].info.shape[1], dtype=torch.float64), name)
    assert e.value.tensor == name


@pytest.mark.parametrize("widen", [8 * 256 * 40, None], ids=["40-row-chunks", "default-chunks"])
def test_fp8_release_shaped_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, widen: int | None
) -> None:
    """A released-shaped FP8 source (ConditionalGeneration, vision tower, MTP, RoPE base 1e7
    with an M-RoPE section, 128 x 128 blocks as Qwen3.5-FP8): the chunked float64 check passes
    its conversion, with chunks that split a scale block (rounded up to whole blocks) or not,
    and fails it once two q heads' weight scales are swapped."""
    from engine_models import build_vl, fp8_copy

    if widen is not None:
        numeric = importlib.import_module("gdnfuse.verify.numeric")
        monkeypatch.setattr(numeric, "WIDEN", widen)
        monkeypatch.setattr(numeric, "READ", 1)
    src = fp8_copy(build_vl(tmp_path / "bf16", moe=False, r=2, head_dim=128, dk=128),
                   tmp_path / "fp8")  # fmt: skip
    config = json.loads((src / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 1e7
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    out = tmp_path / "out"
    convert(src, out, layout="tp-blocked", tp=2, workers=1)
    report = verify(out, against=src)
    assert report.ok, [c for c in report.checks if not c.ok]
    qkvz = f"{P}layers.0.linear_attn.in_proj_qkvz.weight"
    swap_rows(out, f"{qkvz}_scale_inv", 0, 1, 1)  # q heads 0 and 1 (one 128-row block each)
    report = verify(out, against=src)
    assert ("numeric.forward", qkvz) in {(c.name, c.tensor) for c in report.checks if not c.ok}
