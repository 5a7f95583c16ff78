"""The one exception type users catch: a clear, one-line reason tied to a file and tensor."""

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


def _clean(name: str, limit: int = 300) -> str:
    """A name as one bounded line: hostile headers may hold newlines or megabyte-long keys."""
    text = name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."
