"""Installing, the Python API and what a run prints (a new user's first hour, issue 14):
install, environment errors, CI-readable output, dry-run, the Python API, the record, the
demo and synth. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from corrupt import cli, error_line, run_cli

import gdnfuse
from gdnfuse.convert import convert, plan_source
from gdnfuse.errors import GdnfuseError
from gdnfuse.synthetic import write_checkpoint
from gdnfuse.verify import verify

ROOT = Path(__file__).resolve().parent.parent
BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.argv[0] = 'gdnfuse'; "


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fh") / "src", "tiny", shard_bytes=50_000)


def _without_torch(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in args]
    code = BLOCK_TORCH + f"sys.argv[1:] = {argv!r}; from gdnfuse.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


# 1. install --------------------------------------------------------------------------------------


def test_base_install_has_no_torch_and_verify_extra_has_it() -> None:
    """What pip would install for `gdnfuse` and `gdnfuse[verify]` (resolved, not installed)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("torch") for d in meta["dependencies"]), meta["dependencies"]
    assert any(d.startswith("torch") for d in meta["optional-dependencies"]["verify"])

    def resolved(spec: str) -> set[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
             "--no-build-isolation", "--report", "-", spec],
            capture_output=True, text=True, cwd=ROOT, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        names = (i["metadata"]["name"] for i in json.loads(proc.stdout)["install"])
        return {re.sub(r"[-_.]+", "-", n).lower() for n in names}

    base = resolved(".")
    assert "torch" not in base and not any(n.startswith("nvidia") for n in base), base
    assert {"safetensors", "huggingface-hub", "typer", "rich", "tqdm"} <= base


def test_convert_inspect_dry_run_work_without_torch(src: Path, tmp_path: Path) -> None:
    for args in (["inspect", src], ["convert", src, "--out", tmp_path / "d", "--dry-run"],
                 ["convert", src, "--out", tmp_path / "o", "--quiet"]):  # fmt: skip
        proc = _without_torch(*args)
        assert proc.returncode == 0, (args, proc.stderr)
    proc = _without_torch("verify", tmp_path / "o")
    assert proc.returncode == 2 and "pip install 'gdnfuse[verify]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _without_torch("verify", tmp_path / "o", "--no-numeric").returncode == 0


def test_setup_script_requires_python_311_and_says_what_it_does() -> None:
    text = (ROOT / "scripts/setup.sh").read_text()
    assert "Python 3.11 or newer is required" in text and "|| python3 -m venv" not in text
    assert text.count('echo "setup:') >= 3


# 2. environment errors ---------------------------------------------------------------------------


def test_device_cuda_without_cuda_is_one_line_exit_2(src: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = convert(src, tmp_path / "o").out
    proc = run_cli("verify", out, "--against", src, "--device", "cuda")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "sees no CUDA device" in error_line(proc)


# 5. CI-readable output ---------------------------------------------------------------------------


def test_off_a_terminal_every_check_is_one_plain_line(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "o").out
    proc = run_cli("verify", out, "--against", src)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].endswith("PASSED") and not re.search("[┃│┏━]", proc.stdout)
    assert all(re.match(r"(PASS|FAIL|SKIP|INFO) \S+ +\S", ln) for ln in lines[1:]), lines
    assert any(ln.startswith("PASS structure.header") for ln in lines)
    conv = run_cli("convert", src, "--out", tmp_path / "o2")
    assert not re.search("[┃│┏━]", conv.stdout) and "  bytes_rewritten: " in conv.stdout


# 7. --dry-run ------------------------------------------------------------------------------------


def test_dry_run_makes_the_real_pre_checks(src: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("user data")
    proc = run_cli("convert", src, "--out", full, "--dry-run")
    assert proc.returncode == 2 and "not empty" in error_line(proc)
    quiet = run_cli("convert", src, "--out", tmp_path / "q", "--dry-run", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout
    plain = run_cli("convert", src, "--out", tmp_path / "q", "--dry-run")
    assert re.search(r"tokenizer\S*\s.*\bcopy\b", plain.stdout), plain.stdout
    dry = json.loads(run_cli("convert", src, "--out", tmp_path / "q", "--dry-run", "--json").stdout)
    extents = [e for f in dry["files"] for e in f["extents"]]
    assert all(set(e) >= {"source", "offset", "length", "tensors"} for e in extents)
    assert any("in_proj_qkv" in t and "rows" in t for e in extents for t in e["tensors"])
    assert not (tmp_path / "q").exists()


# 8. the Python API -------------------------------------------------------------------------------


def test_api_validates_with_its_own_errors(src: Path, tmp_path: Path) -> None:
    with pytest.raises(GdnfuseError, match="layout='foo': choose one of"):
        plan_source(src, layout="foo")
    with pytest.raises(GdnfuseError, match="tp='2': expected a positive integer"):
        convert(src, tmp_path / "a", tp="2")  # type: ignore[arg-type]
    with pytest.raises(GdnfuseError, match="give a list"):
        verify(convert(src, tmp_path / "b").out, layers="0-1")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()


def test_api_keywords_and_report_truth(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "o", workers=1, link=True).out
    convert(src, out, overwrite=True, checksum=True)
    report = verify(out, against=src, numeric=False)
    assert bool(report) is report.ok is True
    config = json.loads((out / "config.json").read_text())
    config["gdnfuse"]["tp"] = 3  # a broken record
    (out / "config.json").write_text(json.dumps(config))
    bad = verify(out, numeric=False)
    assert not bad and bool(bad) is bad.ok is False
    assert [c.name for c in bad.failures] == [c["name"] for c in bad.to_json()["failures"]]
    assert (Path(gdnfuse.__file__).parent / "py.typed").is_file()


def test_readme_api_example_runs_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)[1]
    assert "/tmp/" not in code
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102
    assert list(tmp_path.iterdir()) == []


# 9. the record -----------------------------------------------------------------------------------


def test_record_leaks_no_path_and_verify_names_a_wrong_source(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "o").out
    text = (out / "config.json").read_text()
    assert str(src.parent) not in text and json.loads(text)["gdnfuse"]["source"]["name"] == "src"
    other = write_checkpoint(tmp_path / "other", "tiny", shard_bytes=50_000, seed=9)
    report = verify(out, against=other, numeric=False)
    first = next(c for c in report.checks if c.name.startswith("exact."))
    assert first.name == "exact.source" and not first.ok
    assert "not the recorded source" in first.detail


# 10. small things --------------------------------------------------------------------------------


def test_small_messages(src: Path, tmp_path: Path) -> None:
    assert subprocess.run(cli("--version"), capture_output=True, text=True).stdout.strip() == (
        f"gdnfuse {gdnfuse.__version__}")  # fmt: skip
    proc = run_cli("convert", tmp_path / "nope", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "does not exist" in error_line(proc)
    out = convert(src, tmp_path / "done").out
    proc = run_cli("convert", src, "--out", out, "--resume")
    assert proc.returncode == 2 and "this output is complete" in error_line(proc)


def test_unwritable_out_is_said_so(src: Path, tmp_path: Path) -> None:
    """Not "0.00 MB free": a read-only filesystem is reported as not writable."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = run_cli("convert", src, "--out", ro / "out")
        assert proc.returncode == 2 and "not writable" in error_line(proc), proc.stderr
    finally:
        subprocess.run(["umount", ro], check=True)


# 11, 12: demo and synth --------------------------------------------------------------------------


def test_demo_cleans_up_and_ends_with_a_verdict(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cli("demo"), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "demo: all conversions verified." in proc.stdout
    assert "$ gdnfuse convert " in proc.stdout and "gdnfuse inspect " in proc.stdout
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_synth_and_naive_help(tmp_path: Path) -> None:
    proc = run_cli("synth", tmp_path / "s", "--preset", "tiny", "--layers", "2")
    assert proc.returncode == 0, proc.stderr
    assert plan_source(tmp_path / "s").summary()["gdn_layers"] == 2
    assert run_cli("synth", tmp_path / "x", "--preset", "nope").returncode == 2
    naive = subprocess.run([sys.executable, ROOT / "scripts/naive_convert.py", "--help"],
                           capture_output=True, text=True)  # fmt: skip
    assert naive.returncode == 0 and "usage" in naive.stdout


# 13. tests clean up ------------------------------------------------------------------------------


def test_pytest_keeps_only_failed_tests_temporaries() -> None:
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert opts["tmp_path_retention_policy"] == "failed"


def test_usage_errors_are_one_line(src: Path, tmp_path: Path) -> None:
    for args in (["convert", src], ["convert", src, "--out", tmp_path / "o", "--layout", "foo"],
                 ["nope"]):  # fmt: skip
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Value error" not in lines[0] and "Usage:" not in lines[0]


def test_verify_reports_progress_and_stays_quiet_off_a_terminal(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "o").out
    seen: list[tuple[str, int, int]] = []
    verify(out, against=src, progress=lambda *step: seen.append(step))
    starts = [next(s for s in seen if s[1] == i) for i in sorted({s[1] for s in seen})]
    assert [s[0].split(" (")[0] for s in starts] == ["structure", "exact bytes", "numeric forward"]
    assert [s[1] for s in starts] == [0, 1, 2] and {s[2] for s in seen} == {3}
    assert [s[1] for s in seen] == sorted(s[1] for s in seen)  # within a step: its progress
    proc = run_cli("verify", out, "--against", src)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_error_classes_a_caller_can_catch(src: Path, tmp_path: Path) -> None:
    from gdnfuse.errors import CheckFailed, OutputError

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        convert(src, full)
    out = convert(src, tmp_path / "o").out
    config = json.loads((out / "config.json").read_text())
    config["gdnfuse"]["layout"] = "nonsense"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckFailed, match="structure.record"):
        verify(out, numeric=False).raise_for_failures()


def test_arch_values_do_not_mix_separators(src: Path, tmp_path: Path) -> None:
    from gdnfuse.arch import Arch

    assert {a.value for a in Arch} == {"qwen3.5", "qwen3-next"}
    assert Arch("qwen3_5") is Arch("qwen3-5") is Arch.QWEN3_5  # older spellings still work
    proc = run_cli("convert", src, "--out", tmp_path / "o", "--arch", "qwen3_5", "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_api_errors_name_keywords_and_cli_errors_name_flags(tmp_path: Path) -> None:
    """Issue 14, item 8: an error raised from the API names the keyword arguments the
    caller passes (overwrite=True, tp=3), never a CLI flag; the CLI says the same thing
    with its flags."""
    src = write_checkpoint(tmp_path / "src", "tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    cases = [
        (dict(out=out), "overwrite=True", ["--overwrite", "--resume"]),
        (dict(out=tmp_path / "o2", tp=3), "tp=3", ["--tp 3"]),
        (dict(out=tmp_path / "o3", engine="vllm"), "engine='vllm'", ["--engine vllm"]),
        (dict(out=tmp_path / "o4", engine="vllm", layout="tp-blocked"), "layout='tp-blocked'",
         ["--layout tp-blocked"]),
        (dict(out=src / "inside"), "out must be", ["--out must be"]),
    ]  # fmt: skip
    for kw, api, flags in cases:
        with pytest.raises(GdnfuseError) as e:
            convert(src, **kw)
        assert api in str(e.value) and " --" not in f" {e.value}", (kw, str(e.value))
        for flag in flags:
            assert flag in e.value.for_cli(), (kw, e.value.for_cli())
        args = [f"--{k} {v}" for k, v in kw.items() if k != "out"]
        proc = run_cli("convert", src, "--out", kw["out"], *" ".join(args).split())
        line = error_line(proc)
        assert proc.returncode == 2 and all(f in line for f in flags), line
    # inspect's per-engine refusals (dense source: vllm refused) are CLI text too
    shown = run_cli("inspect", src).stdout
    assert "refused: --engine vllm:" in shown and "engine='" not in shown, shown
