"""Faults and bad input (issue 9): nothing lost, nothing half-written, every error clear.

Real files and real processes: the CLI runs as a subprocess and is killed mid-copy, disks
fill on a size-limited tmpfs the test mounts, shards are corrupted byte by byte. Every
test checks that the source keeps its bytes, mtimes and inodes, and that nothing appears
outside ``--out``.

Decided behaviour these tests pin down (README "what happens if"):

* killed (SIGKILL): the output has no config.json and no index, so it never looks
  complete; ``convert --resume`` with the same options finishes it byte for byte, and
  ``--overwrite`` starts again; both remove the temporaries the kill left.
* Ctrl-C or SIGTERM: exit 2, temporaries removed, one line saying how to ``--resume``.
* disk full: refused up front when the plan cannot fit; if the disk fills later, exit 2
  with "no space left", temporaries removed. The journal (``.gdnfuse-journal``) stays
  after any failure once writing began, so ``--resume`` can finish after space is freed;
  it is removed on success. A refused input creates nothing at all.
* bad input: exit 2 and one line naming the shard file and the tensor.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from corrupt import (
    INDEX,
    JOURNAL,
    STATE,
    TMP_DIR,
    Fault,
    append_garbage,
    cli,
    digests,
    dir_bytes,
    drop_tensor,
    duplicate_tensor,
    edit_config,
    error_line,
    header_length,
    header_not_json,
    huge_header,
    index_extra_tensor,
    index_missing_file,
    last_tensor,
    leftovers,
    listing,
    looks_complete,
    middle_tensor,
    run_cli,
    set_entry,
    set_rows,
    shard_of,
    shift_offsets,
    sigint_default,
    snapshot,
    truncate_into_header,
    truncate_shard,
    weight_map,
)

from gdnfuse.convert import MANIFEST_NAME
from gdnfuse.convert import convert as api_convert
from gdnfuse.convert import run as api_run
from gdnfuse.errors import GdnfuseError
from gdnfuse.executor import ExecuteOptions
from gdnfuse.synthetic import ModelShape, write_checkpoint

LAYER0 = "model.language_model.layers.0.linear_attn."
QKV, Z, B = (LAYER0 + f"in_proj_{p}.weight" for p in ("qkv", "z", "b"))

# ~26 MB in 19 files of <= 2 MB: the CLI needs tens of ms to copy it, enough to kill it
# at chosen byte counts, and small pieces so the kill points land inside different files.
BIG = ModelShape(hidden=256, layers=8, nk=4, nv=12, dk=32, dv=32, intermediate=1024,
                 heads=4, kv_heads=2, head_dim=64, vocab=8192)  # fmt: skip


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("base") / "tiny", "tiny", shard_bytes=50_000)


@dataclass
class Guarded:
    """A source checkpoint whose files must never change; ``check`` asserts they did not."""

    path: Path
    before: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.before = snapshot(self.path)

    def check(self) -> None:
        assert snapshot(self.path) == self.before, "the source checkpoint was modified"


@pytest.fixture
def src(tiny_base: Path, tmp_path: Path) -> Iterator[Guarded]:
    """A private copy of the tiny checkpoint, checked unchanged again at teardown."""
    guarded = Guarded(Path(shutil.copytree(tiny_base, tmp_path / "src")))
    yield guarded
    guarded.check()


@dataclass(frozen=True)
class Big:
    src: Path
    ref: dict[str, str]  # digests of an uninterrupted run
    total: int


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    root = tmp_path_factory.mktemp("big")
    src = write_checkpoint(root / "src", BIG, shard_bytes=2_000_000, fast=True, seed=3)
    proc = run_cli("convert", src, "--out", root / "ref", "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return Big(src, digests(root / "ref"), dir_bytes(root / "ref"))


@pytest.fixture
def big_src(big: Big) -> Iterator[Guarded]:
    guarded = Guarded(big.src)
    yield guarded
    guarded.check()


class Beaten(Exception):
    """The run finished before the signal could land (a heavily loaded machine)."""


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def stop_at(src: Path, out: Path, at: int, *extra: str, sig: int = signal.SIGKILL,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Start ``convert`` and send ``sig`` once ``out`` holds ``at`` bytes (temporaries too).

    The process is frozen (SIGSTOP) first and the output checked to be unfinished, so the
    signal surely lands mid-run; if the run was faster than the poller, raises Beaten.
    """
    args = ["convert", src, "--out", out, "--workers", "1", "--quiet", *extra]
    with subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=cwd, preexec_fn=sigint_default) as proc:  # fmt: skip
        while proc.poll() is None and dir_bytes(out) < at:
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            while proc.poll() is None and not _stopped(proc.pid):
                time.sleep(0.001)
        mid_run = proc.poll() is None and not looks_complete(out)
        if mid_run:
            proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    if not mid_run:
        raise Beaten(f"finished before reaching {at} bytes: {stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def retried(run: Callable[[], subprocess.CompletedProcess[str]], out: Path,
            attempts: int = 3) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``run`` again from an empty ``out`` when a conversion beat its signal."""
    for attempt in range(attempts):
        try:
            return run()
        except Beaten:
            if attempt == attempts - 1:
                raise
            shutil.rmtree(out)
    raise AssertionError("unreachable")


def stop_fresh(src: Path, out: Path, at: int, *extra: str, sig: int = signal.SIGKILL,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """:func:`stop_at` for a run that starts from nothing (so it can be retried)."""
    return retried(lambda: stop_at(src, out, at, *extra, sig=sig, cwd=cwd), out)


def assert_interrupted(out: Path) -> None:
    """An interrupted output: not complete-looking, resumable."""
    assert not looks_complete(out), sorted(os.listdir(out))
    assert not (out / MANIFEST_NAME).exists()
    assert (out / JOURNAL).is_file()


def assert_finished(out: Path, ref: dict[str, str]) -> None:
    assert digests(out) == ref
    assert leftovers(out) == [] and not (out / JOURNAL).exists()


# --- killed, interrupted, resumed ---------------------------------------------------------


def test_sigkill_at_several_points_then_resume_is_byte_identical(
    big: Big, big_src: Guarded, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    def chain() -> subprocess.CompletedProcess[str]:
        for fraction in (0.05, 0.35, 0.7):  # each resume is killed again, further on
            extra = ("--resume",) if out.exists() else ()
            proc = stop_at(big.src, out, int(big.total * fraction), *extra, cwd=tmp_path)
            assert proc.returncode == -signal.SIGKILL
            assert_interrupted(out)
            big_src.check()
        return proc

    retried(chain, out)
    proc = run_cli("convert", big.src, "--out", out, "--resume", "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_finished(out, big.ref)
    assert listing(tmp_path) == {"out"} | {f"out/{n}" for n in big.ref}


def test_sigkill_with_parallel_workers_then_overwrite_starts_clean(
    big: Big, big_src: Guarded, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = stop_fresh(big.src, out, big.total // 2, "--workers", "3")
    assert proc.returncode == -signal.SIGKILL
    assert_interrupted(out)
    proc = run_cli("convert", big.src, "--out", out, "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_finished(out, big.ref)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_cleanly_and_says_how_to_resume(
    big: Big, big_src: Guarded, tmp_path: Path, sig: int
) -> None:
    out = tmp_path / "out"
    proc = stop_fresh(big.src, out, big.total // 3, sig=sig)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "interrupted" in line and "--resume" in line and str(out) in line
    assert leftovers(out) == []
    assert_interrupted(out)
    big_src.check()
    proc = run_cli("convert", big.src, "--out", out, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_finished(out, big.ref)


def test_resume_with_other_options_is_refused_and_changes_nothing(
    big: Big, big_src: Guarded, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert stop_fresh(big.src, out, big.total // 3).returncode == -signal.SIGKILL
    before = snapshot(out)
    for other in (["--tp", "2"], ["--layout", "tp-blocked"]):
        proc = run_cli("convert", big.src, "--out", out, "--resume", *other)
        assert proc.returncode == 2, proc.stderr
        assert "but the interrupted run used" in error_line(proc)
        assert snapshot(out) == before
    proc = run_cli("convert", big.src, "--out", out, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_finished(out, big.ref)


# --- hard links: never write through into the source ---------------------------------------


@dataclass
class WriteOpens:
    """What an audit hook saw: opens for writing (of watched inodes) and renames."""

    watched: set[tuple[int, int]]
    hits: list[str] = field(default_factory=list)  # write-opens of a watched inode
    written: list[str] = field(default_factory=list)  # every path opened for writing
    renames: list[tuple[str, str]] = field(default_factory=list)
    active: bool = True

    def watch(self, root: Path) -> None:
        self.watched |= {(p.stat().st_dev, p.stat().st_ino) for p in root.iterdir()}


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC


@pytest.fixture
def write_opens() -> Iterator[WriteOpens]:
    """Records ``open``/``os.open`` for writing, and ``os.rename``/``os.replace``, in-process."""
    state = WriteOpens(set())

    def hook(event: str, args: tuple) -> None:
        if not state.active:
            return
        if event == "os.rename":
            state.renames.append((os.fsdecode(args[0]), os.fsdecode(args[1])))
            return
        if event != "open":
            return
        path, _, flags = args
        if isinstance(path, int) or not isinstance(flags, int) or not flags & _WRITE_FLAGS:
            return
        state.written.append(os.fsdecode(path))
        try:
            st = os.stat(path)
        except (OSError, TypeError, ValueError):
            return  # a new file: nothing to write through
        if (st.st_dev, st.st_ino) in state.watched:
            state.hits.append(os.fsdecode(path))

    sys.addaudithook(hook)  # cannot be removed; ``active`` switches it off
    yield state
    state.active = False


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_every_output_is_a_renamed_temporary_and_completion_comes_last(
    src: Guarded, tmp_path: Path, write_opens: WriteOpens, link: bool
) -> None:
    """No output name is ever opened for writing; config.json and the index appear last,
    after the manifest, so no kill can leave an output that looks complete."""
    out = tmp_path / "out"
    api_convert(src.path, out, workers=3, link=link)
    renames = [(s, d) for s, d in write_opens.renames if Path(d).parent != out / STATE]
    finals = [Path(dst).name for _, dst in renames]
    temps = [Path(s) for s, _ in renames]
    assert all(t.parent == out / TMP_DIR for t in temps) and len(set(temps)) == len(temps)
    assert finals[-3:] == [MANIFEST_NAME, "config.json", INDEX]
    written = {Path(p) for p in write_opens.written}
    state = {out / STATE, out / JOURNAL, out / STATE / "owner", out / STATE / "lock",
             out / STATE / "journal.new", out / STATE / "owner.new"}  # fmt: skip
    assert written <= {*temps, *state}, written
    assert sorted(os.listdir(out)) == sorted(finals)  # the state directory is gone


def _linked(out: Path, source: Path) -> set[str]:
    src_inodes = {p.stat().st_ino for p in source.iterdir()}
    return {p.name for p in out.iterdir() if p.stat().st_ino in src_inodes}


def test_write_hook_catches_a_write_open(src: Guarded, write_opens: WriteOpens) -> None:
    """The detector below must be able to fail: an append-open of a watched file is seen."""
    write_opens.watch(src.path)
    victim = src.path / "README.md"
    with open(victim, "ab"):
        pass
    fd = os.open(victim, os.O_RDWR)
    os.close(fd)
    assert write_opens.hits == [str(victim)] * 2
    src.before = snapshot(src.path)  # opening for append without writing changes nothing


def test_overwrite_over_hard_links_never_writes_into_the_source(
    src: Guarded, tmp_path: Path, write_opens: WriteOpens
) -> None:
    out = tmp_path / "out"
    proc = run_cli("convert", src.path, "--out", out, "--link", "--quiet")
    assert proc.returncode == 0, proc.stderr
    linked = _linked(out, src.path)
    assert linked and all((out / n).stat().st_nlink == 2 for n in linked)
    write_opens.watch(src.path)

    # --overwrite with --copy and another layout: every linked name gets new bytes or a new inode.
    api_convert(src.path, out, layout="tp-blocked", tp=2,
                overwrite=True, workers=2)  # fmt: skip
    assert write_opens.hits == []
    assert _linked(out, src.path) == set()
    src.check()
    api_convert(src.path, tmp_path / "ref", layout="tp-blocked", tp=2)
    assert digests(out) == digests(tmp_path / "ref")

    # and back: --overwrite --link relinks the same names, still without opening them.
    proc = run_cli("convert", src.path, "--out", out, "--link", "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert _linked(out, src.path) == linked
    src.check()


def test_resume_after_kill_with_links_never_writes_into_the_source(
    big: Big, big_src: Guarded, tmp_path: Path, write_opens: WriteOpens
) -> None:
    out = tmp_path / "out"
    assert stop_fresh(big.src, out, big.total // 2, "--link").returncode == -signal.SIGKILL
    assert_interrupted(out)
    linked = _linked(out, big.src)
    assert linked
    # The worst moment for a kill: a link is in place but not yet in the journal. Model it
    # by dropping the journal lines of linked files; resume must then replace those names
    # with new links (temporary name + rename) without ever opening them. (Writing new bytes
    # over a linked name is the --overwrite --copy case above.)
    journal = out / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(ln for ln in lines if not any(f'"{n}"' in ln for n in linked)))
    write_opens.watch(big.src)
    # --copy is another output
    with pytest.raises(GdnfuseError, match="link=False but the interrupted run used link=True"):
        api_convert(big.src, out, resume=True, link=False, workers=2)
    api_convert(big.src, out, resume=True, link=True, workers=2)
    assert write_opens.hits == []
    assert _linked(out, big.src) >= linked
    assert_finished(out, big.ref)


# --- disk full ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a size-limited tmpfs (``mount("1m")``); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", point],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", point], check=True)


def fill(fs: Path, leave: int) -> Path:
    """Write a filler file so only about ``leave`` bytes stay free on ``fs``."""
    filler = fs / "filler"
    n = max(0, shutil.disk_usage(fs).free - leave)
    try:
        with open(filler, "wb") as f:
            f.write(b"\0" * n)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    return filler


def test_free_space_check_refuses_a_plan_that_cannot_fit(
    src: Guarded, small_fs: Callable[[str], Path]
) -> None:
    fs = small_fs("256k")
    proc = run_cli("convert", src.path, "--out", fs / "out")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "not enough free space" in line and str(fs / "out") in line
    assert os.listdir(fs) == []


def test_disk_filling_mid_run_fails_clearly_and_resume_finishes(
    src: Guarded, tmp_path: Path, small_fs: Callable[[str], Path]
) -> None:
    fs = small_fs("1m")
    out = fs / "out"
    filler: list[Path] = []
    with pytest.raises(GdnfuseError, match="no space left") as caught:
        # The free-space check passes; then another writer takes the space.
        api_run(src.path, out, ExecuteOptions(),
                on_plan=lambda plan: filler.append(fill(fs, 64 << 10)))
    assert "resume=True" in str(caught.value) and str(out) in str(caught.value)
    assert "--resume" in caught.value.for_cli()
    assert leftovers(out) == [] and not looks_complete(out)
    assert not (out / MANIFEST_NAME).exists()
    assert (out / JOURNAL).is_file()  # resumable once space is freed
    assert set(os.listdir(fs)) == {"out", "filler"}
    src.check()

    filler[0].unlink()
    proc = run_cli("convert", src.path, "--out", out, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    api_convert(src.path, tmp_path / "ref")
    assert_finished(out, digests(tmp_path / "ref"))


def test_disk_full_through_the_cli_is_one_clear_line(
    src: Guarded, small_fs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from typer.testing import CliRunner

    from gdnfuse.cli import app

    convert_module = sys.modules["gdnfuse.convert"]  # the module; gdnfuse.convert: the function
    fs = small_fs("1m")
    real_check = convert_module.check_free_space

    def check_then_fill(out: Path, needed: int, hint: bool = True) -> None:
        real_check(out, needed, hint)
        fill(fs, 64 << 10)

    monkeypatch.setattr(convert_module, "check_free_space", check_then_fill)
    result = CliRunner().invoke(app, ["convert", str(src.path), "--out", str(fs / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0] and "--resume" in lines[0]
    assert leftovers(fs) == [] and not looks_complete(fs / "out")


def test_source_changing_during_the_run_is_reported_and_cleaned_up(
    src: Guarded, tmp_path: Path
) -> None:
    """A shard that shrinks after planning (a download still being written): clear error."""
    out = tmp_path / "out"
    victim = src.path / shard_of(src.path, QKV)

    def shrink(plan: object) -> None:
        os.truncate(victim, victim.stat().st_size // 2)

    with pytest.raises(GdnfuseError, match="source ended") as caught:
        api_run(src.path, out, ExecuteOptions(workers=1), on_plan=shrink)
    assert victim.name in str(caught.value)
    assert leftovers(out) == [] and not looks_complete(out)
    src.before = snapshot(src.path)  # the test itself changed the source


# --- permissions, and nothing outside --out -----------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask_and_nothing_lands_outside_out(
    src: Guarded, tmp_path: Path, umask: int
) -> None:
    out = tmp_path / "nested" / "out"
    before = listing(tmp_path, skip=["src"])
    proc = run_cli("convert", src.path, "--out", out, "--quiet", cwd=tmp_path,
                   preexec_fn=lambda: os.umask(umask))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    after = listing(tmp_path, skip=["src", "nested/out"])
    assert after - before == {"nested", "nested/out"}
    assert set(os.listdir(out)) == set(digests(out)) and JOURNAL not in modes


def test_linked_outputs_keep_the_source_mode(src: Guarded, tmp_path: Path) -> None:
    """A hard link cannot have its own mode: linked shards show the source's (documented)."""
    out = tmp_path / "out"
    proc = run_cli("convert", src.path, "--out", out, "--link", "--quiet",
                   preexec_fn=lambda: os.umask(0o077))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    linked = _linked(out, src.path)
    for p in out.iterdir():
        want = (src.path / p.name).stat().st_mode & 0o777 if p.name in linked else 0o600
        assert p.stat().st_mode & 0o777 == want, p.name


# --- corrupt or odd input -----------------------------------------------------------------


def _qkv_without_z(root: Path) -> Fault:
    drop_tensor(root, Z)
    return Fault(shard_of(root, QKV), QKV, "no in_proj_z")


def _with_text(key: str, value: int) -> Callable[[dict], None]:
    return lambda c: c["text_config"].update({key: value})


def _llama(config: dict) -> None:
    config.clear()
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64)


BAD_INPUTS: dict[str, Callable[[Path], Fault]] = {
    "truncated-shard": lambda r: truncate_shard(r, Z),
    "truncated-inside-header": lambda r: truncate_into_header(r, Z),
    "header-length-past-end": lambda r: header_length(r, Z),
    "header-over-100MB": lambda r: huge_header(r, Z),
    "header-not-json": lambda r: header_not_json(r, Z),
    "offsets-overlap": lambda r: replace(
        shift_offsets(r, middle_tensor(r, shard_of(r, Z)), -2), says="overlap"),
    "offsets-leave-hole": lambda r: replace(
        shift_offsets(r, middle_tensor(r, shard_of(r, Z)), 2), says="hole"),
    "offsets-exceed-data": lambda r: replace(
        shift_offsets(r, last_tensor(r, shard_of(r, Z)), 2), says="exceeds"),
    "trailing-bytes": lambda r: append_garbage(r, Z),
    "dtype-disagrees-with-bytes": lambda r: replace(set_entry(r, Z, dtype="F32"), says="F32"),
    "shape-disagrees-with-bytes": lambda r: replace(
        set_entry(r, Z, shape=[12 * 16 * 2, 64]), says="byte length"),
    "tensor-in-two-shards": lambda r: duplicate_tensor(r, LAYER0 + "norm.weight"),
    "index-names-missing-file": lambda r: index_missing_file(r, Z),
    "index-names-missing-tensor": lambda r: index_extra_tensor(r, Z),
    "qkv-without-z": _qkv_without_z,
    "rows-disagree-with-config": lambda r: set_rows(r, B, 11),
    "nv-not-multiple-of-nk": lambda r: replace(
        edit_config(r, _with_text("linear_num_value_heads", 10)), says="not a multiple"),
    "not-qwen3.5": lambda r: replace(edit_config(r, _llama), says="not a Qwen3.5"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_in_one_line_naming_file_and_tensor(
    case: str, tiny_base: Path, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(tiny_base, tmp_path / "src"))
    fault = BAD_INPUTS[case](root)
    source = Guarded(root)
    proc = run_cli("convert", root, "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert fault.file in line, line
    if fault.tensor:
        assert f"tensor {fault.tensor}" in line, line
    assert fault.says in line, line
    assert listing(tmp_path, skip=["src"]) == {"src"}  # nothing created, not even --out
    source.check()


def test_already_fused_checkpoint_is_refused_pointing_at_verify(
    src: Guarded, tmp_path: Path
) -> None:
    fused = tmp_path / "fused"
    api_convert(src.path, fused)
    fused_files = Guarded(fused)
    proc = run_cli("convert", fused, "--out", tmp_path / "again")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "already fused" in line and "gdnfuse verify" in line
    tensor = line.split("tensor ", 1)[1].split(":", 1)[0]
    assert "in_proj_qkvz" in tensor or "in_proj_ba" in tensor
    assert weight_map(fused)[tensor] in line
    assert not (tmp_path / "again").exists()
    fused_files.check()
