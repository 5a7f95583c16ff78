"""The result of ``gdnfuse verify``: named checks, shown as a table, JSON or JUnit XML.

Each check either passes with one summary line or fails once per fault, naming the file and
tensor, so a CI log points straight at the broken shard. Failures per check are capped: a
truncated 400-tensor shard should say so once per tensor up to a limit, not flood the log.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rich.table import Table
from rich.text import Text

MAX_FAILURES_PER_CHECK = 20
"""Failures kept per check name; the rest are counted in one closing line."""


@dataclass(frozen=True)
class CheckResult:
    """One outcome of one check. ``skipped`` results count as passed (nothing was wrong)."""

    name: str
    ok: bool
    detail: str
    tensor: str | None = None
    file: str | None = None
    skipped: bool = False
    seconds: float = 0.0
    """Wall time of the check that produced this result (its failures share it)."""

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.ok else "FAIL")

    @property
    def where(self) -> str:
        return " : ".join(p for p in (self.file, self.tensor) if p)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "ok": self.ok,
            "detail": self.detail,
            "file": self.file,
            "tensor": self.tensor,
            "seconds": round(self.seconds, 3),
        }


def timed(check: Callable[..., Iterable[CheckResult]], *args: Any) -> list[CheckResult]:
    """Run one check and stamp its results with the seconds it took (reports carry them:
    a CI log shows which check costs what)."""
    started = time.perf_counter()
    results = list(check(*args))
    seconds = time.perf_counter() - started
    return [replace(r, seconds=seconds) for r in results]


def passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def failed(
    name: str, detail: str, *, tensor: str | None = None, file: str | None = None
) -> CheckResult:
    return CheckResult(name, False, detail, tensor=tensor, file=file)


def skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail, skipped=True)


def outcome(name: str, failures: Iterable[CheckResult], ok_detail: str) -> list[CheckResult]:
    """The failures of one check (capped), or a single pass line when there are none."""
    failures = list(failures)
    if not failures:
        return [passed(name, ok_detail)]
    kept = failures[:MAX_FAILURES_PER_CHECK]
    if len(failures) > len(kept):
        kept.append(
            failed(name, f"... and {len(failures) - len(kept)} more failures of this check")
        )
    return kept


@dataclass(frozen=True)
class VerifyReport:
    """All check results of one ``verify`` run; ``ok`` only when none failed."""

    checkpoint: str
    against: str | None
    checks: tuple[CheckResult, ...]
    record: Mapping[str, Any] | None = None
    seconds: float = 0.0
    settings: Mapping[str, Any] = field(default_factory=dict)
    loaded_by: tuple[str, ...] | None = None
    """Engines that load the checkpoint as it is and compute what it holds (gdnfuse's rules,
    :mod:`gdnfuse.engines`): information, never a failure. None: not determined."""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        """The checks that failed (the same list as ``failures`` in :meth:`to_json`)."""
        return tuple(c for c in self.checks if not c.ok)

    def raise_for_failures(self) -> None:
        """Raise :class:`~gdnfuse.errors.CheckFailed` naming the first failure, if any."""
        if self.failures:
            from gdnfuse.errors import CheckFailed

            first = self.failures[0]
            raise CheckFailed(f"{len(self.failures)} check(s) failed; first: {first.name}: "
                              f"{first.detail}", path=first.file, tensor=first.tensor)  # fmt: skip

    def __bool__(self) -> bool:
        """``if report:`` means every check passed (``ok``)."""
        return self.ok

    def lines(self) -> list[str]:
        """One plain line per check, never wrapped: for CI logs and other non-terminals."""
        verdict = "PASSED" if self.ok else f"FAILED ({len(self.failures)} failures)"
        against = f" --against {self.against}" if self.against else ""
        width = max((len(c.name) for c in self.checks), default=0)
        out = [f"gdnfuse verify {self.checkpoint}{against}: {verdict}"]
        for c in self.checks:
            where = f" [{c.where}]" if c.where else ""
            out.append(f"{c.status} {c.name:{width}}  {c.detail}{where}")
        if self.served is not None:
            out.append(self.served)
        return out

    @property
    def served(self) -> str | None:
        """One line: which engines load this checkpoint as it is (None when not determined)."""
        if self.loaded_by is None:
            return None
        if not self.loaded_by:
            return ("INFO no engine gdnfuse knows loads this checkpoint as it is (a stamped "
                    "output?); convert with --engine E to serve it")  # fmt: skip
        return f"INFO loaded as it is by: {', '.join(self.loaded_by)} (`gdnfuse inspect` says why)"

    def table(self) -> Table:
        # Text, not markup: paths and tensor names may contain [brackets].
        verdict = (
            Text("PASSED", "bold green")
            if self.ok
            else Text(f"FAILED ({len(self.failures)} failures)", "bold red")
        )
        against = f" --against {self.against}" if self.against else ""
        table = Table(title=Text.assemble(f"gdnfuse verify {self.checkpoint}{against}: ", verdict))
        table.add_column("check", no_wrap=True)
        table.add_column("result", no_wrap=True)
        table.add_column("where", overflow="fold")
        table.add_column("detail", overflow="fold")
        style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
        for c in self.checks:
            table.add_row(Text(c.name), Text(c.status, style[c.status]), Text(c.where),
                          Text(c.detail))  # fmt: skip
        if self.served is not None:
            table.caption = Text(self.served.removeprefix("INFO "))
        return table

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checkpoint": self.checkpoint,
            "against": self.against,
            "record": dict(self.record) if self.record is not None else None,
            "settings": dict(self.settings),
            "seconds": round(self.seconds, 3),
            "failures": [c.to_json() for c in self.failures],
            "checks": [c.to_json() for c in self.checks],
            "loaded_by": None if self.loaded_by is None else list(self.loaded_by),
        }

    def to_junit(self) -> str:
        """JUnit XML (one testcase per result), the format CI systems render."""
        suites = ET.Element("testsuites", name="gdnfuse verify")
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"gdnfuse verify {self.checkpoint}",
            tests=str(len(self.checks)),
            failures=str(len(self.failures)),
            errors="0",
            skipped=str(sum(c.skipped for c in self.checks)),
            time=f"{self.seconds:.3f}",
        )
        timed_names: set[str] = set()
        for c in self.checks:
            # a check's seconds on its first result only: the results of one check share
            # them, and CI dashboards add testcase times up
            seconds = 0.0 if c.name in timed_names else c.seconds
            timed_names.add(c.name)
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"gdnfuse.verify.{c.name.split('.')[0]}",
                name=f"{c.name} {c.where}".strip(),
                time=f"{seconds:.3f}",
            )
            if c.skipped:
                ET.SubElement(case, "skipped", message=c.detail)
            elif not c.ok:
                ET.SubElement(case, "failure", message=c.detail, type=c.name).text = (
                    f"{c.where}: {c.detail}" if c.where else c.detail
                )
            else:
                ET.SubElement(case, "system-out").text = c.detail
        return ET.tostring(suites, encoding="unicode", xml_declaration=True)
