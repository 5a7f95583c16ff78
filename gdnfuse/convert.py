"""The Python API behind ``gdnfuse inspect`` and ``gdnfuse convert``.

Orchestration only: open the source (local or Hub), plan (:mod:`gdnfuse.fusion`), check
the destination and free space, execute (:mod:`gdnfuse.executor`), write the manifest.
Never imports torch.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from gdnfuse import engines, loaders
from gdnfuse.arch import Arch
from gdnfuse.checkpoint import CONFIG_NAME, MANIFEST_NAME, Checkpoint, open_checkpoint
from gdnfuse.errors import GdnfuseError, NoSpaceError, OutputError, option
from gdnfuse.executor import (
    ExecuteOptions,
    FileResult,
    ProgressFn,
    check_output_dir,
    execute,
    journal_head,
)
from gdnfuse.fusion import CLONE_BLOCK, ConversionPlan, plan_conversion, refuse_fused
from gdnfuse.layout import Layout, check_tp
from gdnfuse.model import describe_config
from gdnfuse.outdir import JOURNAL_NAME, existing_ancestor, finished_files, fs_block
from gdnfuse.plan import OutputFile, Plan


@dataclass(frozen=True)
class ConvertResult:
    plan: ConversionPlan
    out: Path
    files: tuple[FileResult, ...]
    seconds: float
    bytes_allocated: int = 0
    """New blocks the output took on its filesystem (free space before minus after, so other
    writers on that filesystem count too): far below ``bytes_written`` where the
    filesystem cloned source blocks (XFS with reflink, btrfs)."""
    dry_run: bool = False
    """Planned and checked only: nothing was written."""
    free_space_short: int = 0
    """A dry run's missing free space in bytes (0: the output fits)."""

    @property
    def bytes_linked(self) -> int:
        return sum(f.size for f in self.files if f.linked)

    @property
    def bytes_written(self) -> int:
        return sum(f.size for f in self.files if not f.linked and not f.resumed)

    def summary(self) -> dict[str, Any]:
        s = self.plan.summary()
        if self.dry_run:
            s.update(out=str(self.out), dry_run=True, free_space_short_bytes=self.free_space_short)
            return s
        s.update(
            out=str(self.out),
            seconds=round(self.seconds, 3),
            bytes_written=self.bytes_written,
            bytes_linked=self.bytes_linked,
            bytes_allocated=self.bytes_allocated,
            files_resumed=sum(f.resumed for f in self.files),
            throughput_mb_s=round(self.bytes_written / max(self.seconds, 1e-9) / 1e6, 1),
        )
        return s


class SourceFetch(Protocol):
    """Source files still arriving under ``root`` while the conversion runs (``--overlap``).

    The plan is made from stand-ins elsewhere (same names, sizes and headers) and pointed at
    ``root``; ``start`` begins fetching in the order that plan reads, ``wait_for`` is the
    executor's hook, ``finish`` waits for every file (raising the first failure) and ``stop``
    abandons what has not arrived.
    """

    root: Path

    def start(self, plan: Plan) -> None: ...
    def wait_for(self, path: str, cancel: threading.Event) -> None: ...
    def finish(self) -> None: ...
    def stop(self) -> None: ...


def relocate(cplan: ConversionPlan, old: Path, new: Path) -> ConversionPlan:
    """The same plan reading its sources under ``new`` instead of ``old``: every byte and the
    fingerprint are those of a plan made from ``new`` itself, as paths are ``root / name``."""
    prefix = str(old)

    def moved(path: str) -> str:
        rel = os.path.relpath(path, prefix)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise GdnfuseError("plan reads a file outside the source", path=path)
        return str(new / rel)

    files = tuple(
        replace(f, whole_source=moved(f.whole_source) if f.whole_source else None,
                extents=tuple(replace(e, source=moved(e.source)) for e in f.extents))
        for f in cplan.plan.files
    )  # fmt: skip
    return replace(cplan, plan=Plan(files))


def is_hub_source(source: str) -> bool:
    """A Hub repo id, not a local path (the rule: :func:`gdnfuse.hub.is_hub_source`)."""
    from gdnfuse import hub  # imports huggingface_hub lazily

    return hub.is_hub_source(source)


def _check_args(**ints: Any) -> None:
    """The package's own one-line errors for arguments of the wrong type or range."""
    for name, value in ints.items():
        if value is None and name != "tp":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GdnfuseError(f"{name}={value!r}: expected a positive integer")


def _enum(kind: type[Layout] | type[Arch], value: Any, name: str) -> Any:
    try:
        return None if value is None else kind(value)
    except ValueError:
        choices = ", ".join(str(x) for x in kind)
        raise GdnfuseError(f"{name}={value!r}: choose one of {choices}") from None


def plan_source(
    source: str | os.PathLike[str],
    layout: Layout | str | None = None,
    tp: int = 1,
    record_source: Mapping[str, Any] | None = None,
    arch: Arch | str | None = None,
    engine: str | None = None,
    block: int = CLONE_BLOCK,
    text_only: bool = False,
) -> ConversionPlan:
    """Plan the conversion of a local checkpoint directory (reads headers only).

    ``engine``: write what that engine serves correctly (:func:`gdnfuse.engines.choose`);
    ``layout`` and ``arch``, when also given, must agree with it. Without an engine the
    output keeps ``arch`` (default Qwen3.5) and ``layout`` (default qwen3-next), and is
    stamped when some engine would load it with misread rows (every Qwen3.5-named one).
    ``text_only``: a Qwen3-Next output (every ``engine`` output) of a vision-language source
    leaves the vision tower out; without it such a plan is refused in one line.
    """
    _check_args(tp=tp)
    layout_: Layout | None = _enum(Layout, layout, "layout")
    arch_: Arch | None = _enum(Arch, arch, "arch")
    with _gc_paused():
        ckpt = open_checkpoint(source)
        out = resolve_output(ckpt, layout_, tp, arch_, engine)
        cplan = plan_conversion(ckpt, out.layout, out.rows_tp, record_source, out.arch,
                                stamp=out.stamp, serves=out.serves, block=block,
                                text_only=text_only)  # fmt: skip
        return replace(cplan, engines=loaders.to_json(engines.judge_all(loaders.plan_facts(cplan))))


@dataclass(frozen=True)
class OutputChoice:
    """What to write: architecture, row order (layout + the tp that orders its rows)."""

    arch: Arch
    layout: Layout
    rows_tp: int
    stamp: bool
    serves: Mapping[str, Any] | None


def resolve_output(
    ckpt: Checkpoint,
    layout: Layout | None,
    tp: int,
    arch: Arch | None,
    engine_name: str | None,
) -> OutputChoice:
    """Turn ``--engine`` / ``--layout`` / ``--arch`` / ``--tp`` into one output choice."""
    refuse_fused(ckpt)
    model = describe_config(ckpt.config, str(ckpt.root / CONFIG_NAME))
    check_tp(model.dims, tp)
    src = engines.facts(ckpt.config, ckpt.tensors, model.dims, None)
    if engine_name is None:
        arch, layout = arch or Arch.QWEN3_5, layout or Layout.QWEN3_NEXT
        plain = engines.target_facts(engines.Target(arch, engines.Rows(layout, tp)), src)
        return OutputChoice(arch, layout, tp, bool(engines.misreaders(plain)), None)
    spec = engines.engine(engine_name)
    candidates = tuple(t for t in spec.outputs if (arch is None or t.arch is arch)
                       and (layout is None or t.rows.layout is layout))  # fmt: skip
    if not candidates:
        given = " ".join(option(k, str(v)) for k, v in (("arch", arch), ("layout", layout)) if v)
        raise GdnfuseError(
            f"{option('engine', spec.name)} writes {' or '.join(map(str, spec.outputs))}; "
            f"{given} contradicts it (leave it out)"
        )
    target = engines.choose(replace(spec, outputs=candidates), src)
    rows_tp = tp if target.rows.layout is Layout.QWEN3_NEXT else target.rows.tp
    serves = {"name": spec.name, "version": spec.version, "tp": tp, "output": str(target)}
    return OutputChoice(target.arch, target.rows.layout, rows_tp, False, serves)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Planning builds ~5 small objects per tensor and no reference cycles; with 200k tensors
    (MoE) the cyclic collector's repeated passes cost a quarter of ``inspect``'s time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layout: Layout | str | None = None,
    tp: int = 1,
    engine: str | None = None,
    arch: Arch | str | None = None,
    text_only: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    link: bool = False,
    workers: int | None = None,
    checksum: bool = False,
    fsync: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """Convert the checkpoint ``source`` (a directory, or a Hub repo id ``org/name``) into ``out``.

    ``engine``: write what that engine serves correctly (``"vllm"``, ``"sglang"``, ...);
    otherwise ``layout`` (default ``"qwen3-next"``) and ``arch``. ``text_only``: accept a
    Qwen3-Next output of a vision-language source without its vision tower. ``overwrite``,
    ``resume``, ``link``, ``workers``, ``checksum``, ``fsync``: as the CLI options of the same
    names. ``dry_run``: plan and make every check a run makes first, write nothing (the
    result has no files; ``free_space_short`` says how much disk is missing, if any).
    ``progress(n)`` is told each ``n`` bytes written.
    """
    _check_args(tp=tp, workers=workers)
    if overwrite and resume:
        raise GdnfuseError(f"{option('overwrite', True)} and {option('resume', True)} exclude "
                           "each other")  # fmt: skip
    options = ExecuteOptions(
        workers=workers or min(4, os.cpu_count() or 1), link=link, resume=resume,
        overwrite=overwrite, checksum=checksum, fsync=fsync,
    )  # fmt: skip
    return run(source, out, options, layout=layout, tp=tp, engine=engine, arch=arch,
               text_only=text_only, revision=revision, dry_run=dry_run,
               progress=progress)  # fmt: skip


def run(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: ExecuteOptions,
    *,
    layout: Layout | str | None = None,
    tp: int = 1,
    engine: str | None = None,
    arch: Arch | str | None = None,
    text_only: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
    on_plan: Callable[[ConversionPlan], None] | None = None,
    record_source: Mapping[str, Any] | None = None,
    fetch: SourceFetch | None = None,
) -> ConvertResult:
    """:func:`convert` with its run settings given as one :class:`ExecuteOptions`, and the
    hooks the command line needs: ``on_plan`` sees the plan before any byte is written (to
    size a progress bar); ``record_source`` is a Hub source already fetched; with ``fetch``,
    ``source`` holds stand-ins (headers, sizes) and the bytes are read from ``fetch.root`` as
    they arrive, the output and manifest being those of converting ``fetch.root``.
    """
    started = time.perf_counter()
    _check_args(tp=tp, workers=options.workers)
    if isinstance(source, str) and source.startswith("~"):  # hub.is_hub_source: a local path
        source = os.path.expanduser(source)
    out = Path(out).expanduser()
    if options.overwrite and options.resume:
        raise GdnfuseError(f"{option('overwrite', True)} and {option('resume', True)} exclude "
                           "each other")  # fmt: skip
    if fetch is None and record_source is None and is_hub_source(str(source)):
        from gdnfuse import hub

        source, record_source = hub.fetch(str(source), revision=revision, headers_only=dry_run,
                                          out=None if dry_run else Path(out))  # fmt: skip
    cplan = plan_source(source, layout, tp, record_source, arch, engine, block=fs_block(Path(out)),
                        text_only=text_only)  # fmt: skip
    if fetch is not None:
        cplan = relocate(cplan, Path(source), fetch.root)
    settings = {"tp": tp, "layout": str(cplan.layout), "engine": engine,
                "arch": str(Arch(arch)) if arch else None, "text_only": text_only}  # fmt: skip
    out_path = Path(out)
    checked = preflight(cplan, fetch.root if fetch else Path(source), out_path, options,
                        fetched=fetch is not None, dry_run=dry_run)  # fmt: skip
    stale, identity = checked.stale, checked.identity
    if dry_run:
        return ConvertResult(cplan, out_path, (), time.perf_counter() - started, 0, True,
                             checked.short)  # fmt: skip
    if on_plan:
        on_plan(cplan)

    def manifest(results: Sequence[FileResult]) -> list[OutputFile]:
        if fetch is not None:  # the source is complete before the output looks complete
            fetch.finish()
        body = {
            "format": 1,
            "record": cplan.record,
            "plan_fingerprint": cplan.plan.fingerprint(),
            "files": {r.name: {"size": r.size, "sha256": r.sha256} for r in results},
        }
        return [OutputFile(MANIFEST_NAME, (json.dumps(body, indent=2) + "\n").encode())]

    free_before = _free_bytes(out_path)
    try:
        if fetch is not None:  # inside: a Ctrl-C at any point stops the downloads
            fetch.start(cplan.plan)
        files = execute(cplan.plan, out_path, options, progress, before_last=manifest,
                        stale=[MANIFEST_NAME, *stale],
                        wait_for=fetch.wait_for if fetch else None, sources=identity,
                        settings=settings)  # fmt: skip
    except BaseException:
        if fetch is not None:
            fetch.stop()
        raise
    allocated = max(0, free_before - _free_bytes(out_path))
    return ConvertResult(cplan, out_path, files, time.perf_counter() - started, allocated)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(existing_ancestor(path))
    return st.f_bfree * st.f_frsize


@dataclass(frozen=True)
class Preflight:
    """What the checks before a run found: the stale names ``overwrite`` removes, the source
    identity for the journal, and the free space missing (0: it fits)."""

    stale: list[str]
    identity: dict[str, list[Any]]
    short: int


def preflight(
    cplan: ConversionPlan, source: Path, out: Path, options: ExecuteOptions, fetched: bool = False,
    dry_run: bool = False,
) -> Preflight:  # fmt: skip
    """Every check a run makes before writing: ``--out`` apart from the source, usable
    (empty, or ``overwrite``/``resume``), writable, big enough. ``dry_run``: a disk too
    small is reported (``short``), not refused: the plan is what says how big a disk to get."""
    check_destination(source, out)
    check_output_dir(out, cplan.plan, options)
    probe = existing_ancestor(out)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError("not writable (permission denied)", path=str(probe))
    new_names = {f.name for f in cplan.plan.files} | {MANIFEST_NAME}
    stale = sorted(_previous_outputs(out) - new_names) if options.overwrite else []
    identity = {} if fetched else source_identity(cplan.plan)
    skip = linkable(cplan, out) if options.link else set()
    if options.resume and (out / JOURNAL_NAME).is_file():
        # Only to size the free-space check: the executor decides, under the lock.
        with contextlib.suppress(GdnfuseError):
            skip |= set(finished_files(out, journal_head(cplan.plan, options, identity)))
    hint = not options.link and bool(linkable(cplan, out))  # only where it would help
    needed = sum(f.size for f in cplan.plan.files if f.name not in skip)
    if dry_run:
        return Preflight(stale, identity, max(0, needed - shutil.disk_usage(probe).free))
    check_free_space(out, needed, hint)
    return Preflight(stale, identity, 0)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def check_destination(source: Path, out: Path) -> None:
    """Refuse an output that is, contains or lies inside the source.

    Compared by device and inode, not by path: a bind mount (or a symlinked folder) shows
    the same directory under another name.
    """
    src = _identity(source)
    dst_chain = [existing_ancestor(out), *existing_ancestor(out).parents]
    inside = any(_identity(p) == src for p in dst_chain)
    above = out.exists() and any(
        _identity(p) == _identity(out) for p in [source.absolute(), *source.absolute().parents]
    )
    if inside or above:
        raise GdnfuseError(
            f"{option('out')} must be a separate directory, neither the source, inside it, "
            "nor above it",
            path=str(out),
        )


def linkable(cplan: ConversionPlan, out: Path) -> set[str]:
    """Untouched shards that ``--link`` can really hard-link: same filesystem as ``out``.

    Elsewhere link(2) fails with EXDEV and the shard is copied, so its bytes count."""
    dev = existing_ancestor(out).stat().st_dev
    whole = {f.name: f.whole_source for f in cplan.plan.files if f.whole_source}
    # A source still downloading (--overlap) lands where its nearest existing folder is.
    def device(path: str) -> int:
        return existing_ancestor(Path(os.path.realpath(path))).stat().st_dev

    return {n for n in cplan.untouched if n in whole and device(whole[n]) == dev}


def source_identity(plan: Plan) -> dict[str, list[Any]]:
    """Size, mtime_ns, inode and a hash of the safetensors header of every source file, for
    the journal: ``--resume`` must not finish a run whose source bytes changed."""
    out: dict[str, list[Any]] = {}
    paths = {e.source for f in plan.files for e in f.extents}
    paths |= {f.whole_source for f in plan.files if f.whole_source}
    for path in sorted(paths):
        try:
            st = os.stat(path)
            digest = ""
            if path.endswith(".safetensors"):
                with open(path, "rb") as fh:
                    head = fh.read(8)
                    n = int.from_bytes(head, "little") if len(head) == 8 else 0
                    digest = hashlib.sha256(head + fh.read(min(n, 100 << 20))).hexdigest()
        except OSError as e:
            raise GdnfuseError(f"cannot read source: {e.strerror or e}", path=path) from None
        out[path] = [st.st_size, st.st_mtime_ns, st.st_ino, digest]
    return out


def check_free_space(out: Path, needed: int, hint: bool = True) -> None:
    """Refuse before starting when the plan cannot fit on the output's filesystem."""
    probe = existing_ancestor(out)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise NoSpaceError(
            f"not enough free space: needs {_size(needed)} but only {_size(free)} are free on "
            "that filesystem"
            + (f" (consider {option('link', True)} to hard-link untouched shards)" if hint
               else ""),  # fmt: skip
            path=str(out), needed=needed, free=free,
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _previous_outputs(out: Path) -> set[str]:
    """Files an earlier conversion wrote here (from its manifest), to clear stale ones.

    An earlier output without a manifest leaves nothing to go on; the executor anyway only
    removes plain names inside ``out``.
    """
    try:
        files = json.loads((out / MANIFEST_NAME).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in files if isinstance(name, str)} if isinstance(files, dict) else set()
