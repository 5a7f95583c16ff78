"""What the reports and messages say about paths, sizes and progress (issue 21, the first
hour's second pass, and the dry run of issue 20): paths, synth, verify's progress, one JSON
shape, numbers that say what they mean, a plan shown whatever the disk. Each test failed
before its fix."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from corrupt import error_line, run_cli
from typer.testing import CliRunner

from gdnfuse.cli import app
from gdnfuse.convert import convert, plan_source
from gdnfuse.synthetic import write_checkpoint
from gdnfuse.verify import verify

CONVERT = sys.modules["gdnfuse.convert"]  # the module (gdnfuse.convert is the function)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("nu") / "Qwen3.5-tiny", "tiny",
                            shard_bytes=60_000)  # fmt: skip


def test_a_mistyped_local_path_is_not_a_hub_repo(src: Path, tmp_path: Path) -> None:
    """``./ck/Qwen3.5-27b`` (the folder is ``Qwen3.5-27B``) is a missing directory, never a
    Hub download; an ``org/name`` that is neither says both."""
    ck = tmp_path / "ck"
    ck.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for given in ("./ck/Qwen3.5-27b", "ck/Qwen3.5-27b", str(ck / "Qwen3.5-27b")):
        proc = run_cli("inspect", given, cwd=tmp_path, env=env)
        line = error_line(proc)
        assert proc.returncode == 2 and "directory" in line and "does not exist" in line, line
        assert "huggingface" not in line.lower() and "hub" not in line.lower(), line
        assert "file " not in line, line
    proc = run_cli("convert", "nobody-org/no-model", "--out", tmp_path / "o", cwd=tmp_path,
                   env=env)  # fmt: skip
    line = error_line(proc)
    assert "no local directory nobody-org/no-model; as a Hub repo:" in line, line


def test_synth_says_what_it_writes_and_offers_a_smaller_vocabulary(tmp_path: Path) -> None:
    proc = run_cli("synth", tmp_path / "a", "--preset", "qwen3.5-0.8b", "--layers", "1",
                   "--vocab", "1024")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "writing" in proc.stderr and "vocabulary 1024" in proc.stderr
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 1024
    shutil.rmtree(tmp_path / "a")
    proc = run_cli("synth", tmp_path / "b", "--layers", "1", "--preset", "tiny", "--vocab", "4096")
    assert proc.returncode == 0 and "embeddings and lm_head are" in proc.stderr, proc.stderr
    assert "--vocab" in proc.stderr


def test_verify_progress_tells_bytes_and_layers(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "o", tp=2, workers=1).out
    seen: list[tuple[str, int, int]] = []
    assert verify(out, against=src, progress=lambda *a: seen.append(a)).ok
    exact = [s for s, _, _ in seen if s.startswith("exact bytes: ")]
    assert len(exact) > 3 and exact[-1] != exact[0], exact
    # The numeric check runs alongside the byte comparison: its layer shows on the same line.
    line = r"exact bytes: [0-9.]+ MB of [0-9.]+ MB(; numeric forward: [1-3] of 3 GDN layers)?"
    assert all(re.fullmatch(line, s) for s in exact), exact
    layers = [s for s, _, _ in seen if s.startswith("numeric forward: ")]
    assert layers and layers[-1].endswith("(3 of 3 GDN layers, float64)"), layers
    told = [int(n) for s, _, _ in seen for n in re.findall(r"([1-3]) of 3 GDN layers", s)]
    assert told == sorted(told), told
    assert {total for _, _, total in seen} == {3}


def test_convert_and_dry_run_print_one_json_shape(src: Path, tmp_path: Path) -> None:
    dry = json.loads(run_cli("convert", src, "--out", tmp_path / "o", "--tp", "2",
                             "--dry-run", "--json").stdout)  # fmt: skip
    done = json.loads(run_cli("convert", src, "--out", tmp_path / "o", "--tp", "2",
                              "--json").stdout)  # fmt: skip
    plan_keys = set(plan_source(src, tp=2).summary())
    assert {"engines", "loaded_by"} <= plan_keys
    assert plan_keys <= set(dry) and plan_keys <= set(done)
    assert dry["dry_run"] is True and "files" in dry and "record" in dry
    assert {k: dry[k] for k in ("bytes_total", "engines", "loaded_by", "layout")} == {
        k: done[k] for k in ("bytes_total", "engines", "loaded_by", "layout")}  # fmt: skip


def test_numbers_say_what_they_mean(src: Path, tmp_path: Path) -> None:
    proc = run_cli("convert", src, "--out", tmp_path / "o", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "if the filesystem clones" in proc.stdout
    assert not re.search(r"\(\d+ ranges\)", proc.stdout), proc.stdout
    assert "rewrite (from" in proc.stdout
    proc = run_cli("convert", src, "--out", tmp_path / "o")
    assert "other writers on it count too" in proc.stdout


def test_dry_run_prints_the_plan_of_a_source_bigger_than_the_disk(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage

    def tiny_disk(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(CONVERT.shutil, "disk_usage", tiny_disk)
    res = CliRunner().invoke(app, ["convert", str(src), "--out", str(tmp_path / "o"),
                                   "--dry-run", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["files"]
    assert plan["free_space_short_bytes"] == sum(f["size"] for f in plan["files"]) - 1000
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(line) == 1 and "not enough free space" in line[0] and "more needed" in line[0]
    res = CliRunner().invoke(app, ["convert", str(src), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not enough free space" in res.stderr


def test_verify_reports_carry_each_checks_seconds(src: Path, tmp_path: Path) -> None:
    """A CI log says which check costs what: seconds per check in JSON, time per JUnit case."""
    import xml.etree.ElementTree as ET

    out = convert(src, tmp_path / "o", tp=2, workers=1).out
    report = verify(out, against=src)
    checks = report.to_json()["checks"]
    assert all(isinstance(c["seconds"], float) and c["seconds"] >= 0 for c in checks)
    assert any(c["seconds"] > 0 for c in checks)
    numeric = next(c for c in checks if c["name"] == "numeric.forward")
    assert numeric["seconds"] > 0
    cases = ET.fromstring(report.to_junit()).iter("testcase")
    assert all(float(case.get("time", "x")) >= 0 for case in cases)


def test_the_package_is_the_api(src: Path, tmp_path: Path) -> None:
    """``from gdnfuse import convert, verify, inspect, plan``; a dry run writes nothing."""
    import gdnfuse

    assert {"convert", "verify", "inspect", "plan"} <= set(gdnfuse.__all__)
    dry = gdnfuse.convert(src, tmp_path / "o", engine="transformers", text_only=True,
                          dry_run=True)  # fmt: skip
    assert dry.dry_run and dry.files == () and not (tmp_path / "o").exists()
    assert dry.summary()["dry_run"] is True and dry.summary()["loaded_by"]
    result = gdnfuse.convert(src, tmp_path / "o", engine="transformers", text_only=True)
    assert gdnfuse.verify(result.out, against=src, numeric=False)
    assert gdnfuse.inspect(result.out)["transformers"].outcome.value == "loads"
    assert gdnfuse.plan(src).summary()["loaded_by"] == []


def test_setup_scripts_keep_pips_noise_out_of_the_log() -> None:
    """Every pip install in the set-up scripts goes through the wrapper that shows pip's output
    only when pip fails (sglang is installed without its CUDA pins on purpose: pip's resolver
    complains about 45 lines), and each step says what it installs and why in one line."""
    root = Path(__file__).resolve().parent.parent / "scripts"
    for name in ("setup.sh", "setup-engines.sh"):
        lines = (root / name).read_text().splitlines()
        wrapper = [i for i, ln in enumerate(lines) if re.match(r"(pip_q|cpu_torch)\(\) \{", ln)]
        inside = {i for start in wrapper for i in range(start, start + 4)}
        raw = [ln for i, ln in enumerate(lines)
               if "-m pip install" in ln and i not in inside]  # fmt: skip
        assert not raw, (name, raw)
        assert any(ln.strip().startswith('echo "setup') for ln in lines)
