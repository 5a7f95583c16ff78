"""The exceptions users catch: a clear, one-line reason tied to a file and tensor.

Everything gdnfuse raises on purpose is a :class:`GdnfuseError` (bad input, by default);
the subclasses let a caller tell apart what to do next: :class:`OutputError` (fix the
output directory; :class:`NoSpaceError`: free space), :class:`SetupError` (install
something), :class:`Interrupted` (resume), :class:`CheckFailed` (the checkpoint is wrong).
"""

from __future__ import annotations

import errno
import json
import re
from typing import Any

_OPTION = re.compile("\ue000(.*?)\ue001")
"""An :func:`option` inside a message (private-use code points never occur in real text)."""


def option(name: str, *value: Any) -> str:
    """An option a message names, spelled the way the reader called gdnfuse.

    ``str(error)`` (the Python API) shows ``overwrite=True`` / ``tp=2`` / ``out``;
    :meth:`GdnfuseError.for_cli` shows ``--overwrite`` / ``--tp 2`` / ``--out``. One message
    serves both, and an API caller is never told about flags it did not pass.
    """
    return "\ue000" + json.dumps([name, *value]) + "\ue001"


def render(message: str, *, cli: bool) -> str:
    """``message`` with its :func:`option` marks spelled for the API or for the CLI."""

    def one(m: re.Match[str]) -> str:
        name, *value = json.loads(m.group(1))
        if not cli:
            return f"{name}={value[0]!r}" if value else name
        flag = "--" + name.replace("_", "-")
        if not value or value[0] is True:
            return flag
        if value[0] is False or value[0] is None:
            return f"no {flag}"
        return f"{flag} {value[0]}"

    return _OPTION.sub(one, message)


class GdnfuseError(Exception):
    """Bad input or an impossible request (CLI exit code 2).

    The message is one line; ``path`` and ``tensor`` say where the problem is, so a user
    with an 800 GB checkpoint knows which shard and which tensor to look at. Options it
    names read as keywords in ``str(error)`` and as flags in :meth:`for_cli`.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None,
                 kind: str = "file") -> None:  # fmt: skip
        self.message = message
        self.reason = render(message, cli=False)
        self.path = path
        self.tensor = tensor
        self.kind = kind
        """What ``path`` names: ``file`` or ``directory``."""
        super().__init__(self._where(self.reason))

    def _where(self, text: str) -> str:
        parts = (self.path and f"{self.kind} {_clean(self.path)}",
                 self.tensor and f"tensor {_clean(self.tensor)}")  # fmt: skip
        where = ", ".join(p for p in parts if p)
        return f"{where}: {text}" if where else text

    def for_cli(self) -> str:
        """The message as the command line says it (options as ``--flags``)."""
        return self._where(render(self.message, cli=True))


class OutputError(GdnfuseError):
    """The output directory cannot take this run: not empty, held by another run, nothing
    to resume, not writable, or a write failed."""

    @classmethod
    def writing(cls, e: OSError, path: Any) -> OutputError:
        """One clear line for a failed write; a full disk says how to finish the run."""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpaceError(
                f"no space left on the device (ENOSPC); free space and rerun with "
                f"{option('resume', True)}",
                path=str(path),
            )
        return cls(f"cannot write: {e.strerror or e}", path=str(path))


class NoSpaceError(OutputError):
    """Not enough free space, found before a run (``needed`` and ``free``, in bytes, on the
    filesystem at ``path``) or when a write failed with ENOSPC (both None)."""

    def __init__(self, message: str, *, path: str | None = None, needed: int | None = None,
                 free: int | None = None) -> None:  # fmt: skip
        super().__init__(message, path=path)
        self.needed = needed
        self.free = free


class SetupError(GdnfuseError):
    """This environment cannot do what was asked: torch, CUDA or an engine is missing."""


class Interrupted(GdnfuseError):
    """The run was stopped (Ctrl-C, SIGTERM); an interrupted conversion can be resumed."""


class CheckFailed(GdnfuseError):
    """A verification check failed (:meth:`gdnfuse.verify.VerifyReport.raise_for_failures`)."""


def _clean(name: str, limit: int = 300) -> str:
    """A name as one bounded line: hostile headers may hold newlines or megabyte-long keys."""
    text = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."
