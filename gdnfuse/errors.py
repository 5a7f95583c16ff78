"""The exceptions users catch: a clear, one-line reason tied to a file and tensor.

Everything gdnfuse raises on purpose is a :class:`GdnfuseError` (bad input, by default);
the subclasses let a caller tell apart what to do next: :class:`OutputError` (fix the
output directory), :class:`SetupError` (install something), :class:`Interrupted` (resume),
:class:`CheckFailed` (the checkpoint is wrong).
"""

from __future__ import annotations


class GdnfuseError(Exception):
    """Bad input or an impossible request (CLI exit code 2).

    The message is one line; ``path`` and ``tensor`` say where the problem is, so a user
    with an 800 GB checkpoint knows which shard and which tensor to look at.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None) -> None:
        self.reason = message
        self.path = path
        self.tensor = tensor
        where = ", ".join(
            p for p in (path and f"file {_clean(path)}", tensor and f"tensor {_clean(tensor)}") if p
        )
        super().__init__(f"{where}: {message}" if where else message)


class OutputError(GdnfuseError):
    """The output directory cannot take this run: not empty, held by another run, not
    writable, too small, or a write failed (a full disk: free space, then resume)."""


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
