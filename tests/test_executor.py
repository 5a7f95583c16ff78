"""The executor on hand-built plans: no model, no checkpoint, just files and byte ranges.

What it promises any plan: every output byte is the planned prefix or source range; whole
copies may be hard-linked; ``last`` files come after every other; a failed run leaves a
journal that ``resume`` finishes, redoing only what is missing; a directory it must not touch
is refused with an :class:`OutputError` before anything is written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gdnfuse import copier
from gdnfuse.errors import NoSpaceError, OutputError
from gdnfuse.executor import ExecuteOptions, execute
from gdnfuse.outdir import STATE_DIR
from gdnfuse.plan import Extent, OutputFile, Plan


@pytest.fixture()
def sources(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "src" / "a.bin", tmp_path / "src" / "b.bin"
    a.parent.mkdir()
    a.write_bytes(os.urandom(300_000))
    b.write_bytes(os.urandom(70_000))
    return a, b


def make_plan(a: Path, b: Path) -> tuple[Plan, dict[str, bytes]]:
    """Four kinds of file, and the bytes each must end up holding."""
    da, db = a.read_bytes(), b.read_bytes()
    plan = Plan((
        OutputFile("mixed.bin", b"HEADER",
                   (Extent(str(a), 10, 250_000), Extent(str(b), 5, 60_000))),
        OutputFile("copy.bin", extents=(Extent(str(b), 0, len(db)),), whole_source=str(b)),
        OutputFile("sub/new.txt", b"written from scratch\n"),
        OutputFile("done.json", b"{}\n", last=True),
    ))  # fmt: skip
    want = {
        "mixed.bin": b"HEADER" + da[10:250_010] + db[5:60_005],
        "copy.bin": db,
        "sub/new.txt": b"written from scratch\n",
        "done.json": b"{}\n",
    }
    return plan, want


def held(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and STATE_DIR not in p.parts
    }


@pytest.mark.parametrize("link", [False, True])
def test_every_byte_is_the_planned_one(sources: tuple[Path, Path], tmp_path: Path, link: bool):
    plan, want = make_plan(*sources)
    out = tmp_path / "out"
    results = execute(plan, out, ExecuteOptions(workers=2, link=link, checksum=True))
    assert held(out) == want
    assert not (out / STATE_DIR).exists()  # nothing of the run's state is left
    assert [r.name for r in results] == [f.name for f in plan.files]  # in plan order
    linked = {r.name for r in results if r.linked}
    assert linked == ({"copy.bin"} if link else set())
    assert (out / "copy.bin").stat().st_ino == sources[1].stat().st_ino if link else True
    assert all(r.sha256 and len(r.sha256) == 64 for r in results)


def test_last_files_come_after_every_other(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, _ = make_plan(*sources)
    order: list[str] = []
    real = copier.write_file

    def traced(f: OutputFile, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        order.append(f.name)
        return real(f, *args, **kwargs)

    monkeypatch.setattr("gdnfuse.executor.write_file", traced)
    extra = OutputFile("manifest.json", b"[]")
    execute(plan, tmp_path / "out", ExecuteOptions(workers=3), before_last=lambda done: [extra])
    assert set(order[:3]) == {"mixed.bin", "copy.bin", "sub/new.txt"}
    assert order[3:] == ["manifest.json", "done.json"]


def test_a_failed_run_resumes_redoing_only_what_is_missing(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, want = make_plan(*sources)
    out = tmp_path / "out"
    real = copier.write_file
    written: list[str] = []

    def full_disk(f: OutputFile, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if f.name == "sub/new.txt":  # the last of the bulk (largest files go first)
            raise OutputError.writing(OSError(errno.ENOSPC, "No space left on device"), f.name)
        written.append(f.name)
        return real(f, *args, **kwargs)

    monkeypatch.setattr("gdnfuse.executor.write_file", full_disk)
    with pytest.raises(NoSpaceError, match="free space and rerun with resume=True"):
        execute(plan, out, ExecuteOptions(workers=1))
    assert (out / STATE_DIR / "journal").is_file()  # kept: the run can be finished
    assert not (out / "done.json").exists()  # never looks finished
    assert not (out / "sub/new.txt").exists()
    finished = set(written)
    assert finished == {"mixed.bin", "copy.bin"}
    monkeypatch.setattr("gdnfuse.executor.write_file", real)
    results = execute(plan, out, ExecuteOptions(workers=1, resume=True))
    assert held(out) == want
    assert {r.name for r in results if r.resumed} == finished


def test_a_directory_it_must_not_touch_is_refused(sources: tuple[Path, Path], tmp_path: Path):
    plan, want = make_plan(*sources)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(OutputError, match="not empty"):
        execute(plan, out)
    with pytest.raises(OutputError, match="nothing to resume: no interrupted gdnfuse run"):
        execute(plan, out, ExecuteOptions(resume=True))
    assert sorted(os.listdir(out)) == ["mine.txt"]  # not even the lock was left
    execute(plan, out, ExecuteOptions(overwrite=True))
    assert held(out) == {**want, "mine.txt": b"the user's"}  # not the plan's: kept
    with pytest.raises(OutputError, match="nothing to resume: this output is complete"):
        execute(plan, out, ExecuteOptions(resume=True))  # its last files say it is finished
    (out / "file").mkdir()
    with pytest.raises(OutputError, match="not a directory"):
        execute(plan, out / "mine.txt")


def test_resume_of_another_plan_is_refused(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, _ = make_plan(*sources)
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr("gdnfuse.executor.write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(plan, out, ExecuteOptions(workers=1))
    monkeypatch.undo()
    other = Plan((*plan.files[:-1], OutputFile("done.json", b"{ }\n", last=True)))
    with pytest.raises(OutputError, match="different options or inputs"):
        execute(other, out, ExecuteOptions(resume=True))
