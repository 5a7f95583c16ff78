"""What the command line prints: tables on a terminal, one plain line per row elsewhere (CI
logs), progress bars on a terminal only, and the one-line warnings and notes on stderr.

Rendering only: the commands (:mod:`gdnfuse.cli`) decide what to say, this module how.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)

NOTES = {
    "bytes_clonable": "; shared with the source instead of written, if the filesystem clones "
    "(XFS, btrfs, OpenZFS; not ext4)",
    "bytes_allocated": "; the output filesystem's free space before minus after (other "
    "writers on it count too)",
    "free_space_short_bytes": "; more than the output's filesystem has free",
}
"""What a summary number means, where a bare number misleads."""


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def shown_value(key: str, value: Any) -> str:
    """A summary value as a person reads it: sizes in units, dims as k=v, lists shortened."""
    if key.startswith("bytes_") or key == "total_size" or key == "free_space_short_bytes":
        note = NOTES.get(key, "")
        return f"{human(value)} ({value:,} B){note}"
    if key == "layers":
        return f"{len(value)} ({value[0]} ... {value[-1]})" if value else "0"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(shown(str(v)) for v in value)
    return shown(str(value))


def shown_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as the table shows it: the engine verdicts have their own table."""
    kept = {k: v for k, v in summary.items() if k not in ("engines", "loaded_by", "dry_run")
            and not (k == "free_space_short_bytes" and not v)}  # fmt: skip
    if "loaded_by" in summary:
        kept["loaded_by"] = ", ".join(summary["loaded_by"]) or (
            "no engine (stamped so that none misreads it; convert with --engine E)")
    return kept


def summary_table(title: str, summary: dict[str, Any]) -> Table | Text:
    """A two-column table on a terminal; one ``key: value`` line each elsewhere (CI logs)."""
    if not out.is_terminal:
        lines = [title, *(f"  {k}: {shown_value(k, v)}" for k, v in summary.items())]
        return Text("\n".join(lines))
    table = Table(title=Text(title), show_header=False)
    for key, value in summary.items():
        table.add_row(key, Text(shown_value(key, value)))
    return table


def engine_table(title: str, found: dict[str, dict[str, str]]) -> Text:
    """Per engine, one plain line (never wrapped into cells, readable in a CI log): verdict,
    engine, version and evidence, why; for a source also what ``--engine`` would write."""
    style = {"loads": "green", "refuses": "yellow", "misreads": "bold red", "unknown": "red"}
    text = Text(f"{title} (run: tested against the real engine here; read: from its code)\n")
    width = max(len(f"{e['engine']} ({n})") for n, e in found.items())
    for name, e in found.items():
        text.append(f"  {e['outcome'].upper():9}", style=style.get(e["outcome"], ""))
        text.append(f"{e['engine'] + ' (' + name + ')':{width}}  [{e['version']}; "
                    f"{e['evidence']}]  {e['reason']}\n")  # fmt: skip
        if "convert_engine_writes" in e:
            text.append(f"  {'':9}{'':{width}}  convert --engine {name}: "
                        f"{e['convert_engine_writes']}\n")  # fmt: skip
    text.rstrip()
    return text


def warn_unservable(loaded_by: list[str]) -> None:
    """One line when no engine gdnfuse knows loads the output as it is (the stamped default)."""
    if not loaded_by:
        err.print(Text.assemble(("note: ", "bold yellow"),
                                "no engine loads this output as it is (stamped so that none "
                                "misreads it); to serve it, convert with --engine E (see "
                                "`gdnfuse inspect SOURCE`). vLLM and sglang serve the split "
                                "source as it is: they fuse at load"), soft_wrap=True)  # fmt: skip


def warn_text_only(summary: dict[str, Any]) -> None:
    """One line when the output leaves the source's vision tower out (``--text-only``)."""
    arch = summary.get("arch") or {}
    if arch.get("dropped_tensors"):
        files = arch.get("dropped_files") or []
        err.print(Text.assemble(("note: ", "bold yellow"),
                                f"text-only output: the vision tower ({arch['dropped_tensors']} "
                                f"tensors, {human(arch.get('dropped_bytes', 0))})"
                                + (f" and {', '.join(files)}" if files else "")
                                + " are left out (--text-only); to serve images, serve the "
                                "source"), soft_wrap=True)  # fmt: skip


def warn_skipped(summary: dict[str, Any]) -> None:
    """One stderr line for source files that were never read (FIFOs, sockets, devices)."""
    odd = summary.get("not_regular_files")
    if odd:
        names = ", ".join(shown(n) for n in odd[:5]) + (" ..." if len(odd) > 5 else "")
        err.print(Text.assemble(("warning: ", "bold yellow"),
                                f"skipped {len(odd)} source file(s) that are not regular files "
                                f"(not a regular file: {names})"), soft_wrap=True)  # fmt: skip


def shown(name: str) -> str:
    """A file name printable on any terminal (non-UTF-8 bytes as \\x escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def warn_misreaders(found: dict[str, dict[str, str]]) -> None:
    """One stderr line when some engine would load the output and compute something else."""
    bad = [e["engine"] for e in found.values() if e["outcome"] == "misreads"]
    if bad:
        err.print(Text.assemble(("warning: ", "bold yellow"),
                                f"{', '.join(bad)} would load this output with misread weights "
                                "(no engine reads the layout record); serve it only with the "
                                "engines listed as loading it"), soft_wrap=True)  # fmt: skip


@contextmanager
def steps(show: bool):
    """verify's steps as a bar with the current step's name, on a terminal only."""
    if not show:
        yield None
        return
    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   "{task.fields[steps]}", TimeElapsedColumn(), console=err,
                   transient=True)  # fmt: skip
    task = bar.add_task("opening the checkpoint", total=None, steps="")
    with bar:
        yield lambda name, done, total: bar.update(task, description=name, completed=done,
                                                   total=total,
                                                   steps=f"step {done + 1} of {total}")  # fmt: skip


@contextmanager
def progress(show: bool, what: str = "converting"):
    """A byte progress bar with throughput and ETA on a terminal; nothing otherwise. Yields
    ``(set_total, advance)``; ``advance`` is None when nothing is shown."""
    if not show:
        yield (lambda total: None), None
        return
    bar = Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
    )  # fmt: skip
    task = bar.add_task(what, total=None)
    with bar:
        yield (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))
