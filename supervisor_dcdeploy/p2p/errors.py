"""The fetch error family the agent catches in one place.

``supervisor_dcdeploy.fetch`` (the HTTP fetcher) defines these names; they are imported from
there, so they are *the same classes*: an agent catching ``fetch.VerificationError`` also
catches a swarm verification failure. The fallback definitions (same constructor keywords)
only serve a tree without ``fetch.py``.
"""

from __future__ import annotations

try:  # pragma: no cover - depends on a colleague's module landing
    from supervisor_dcdeploy.fetch import (DiskFull, DownloadError, FetchError,  # type: ignore
                                           VerificationError)
except ImportError:  # pragma: no cover
    class FetchError(Exception):  # type: ignore[no-redef]
        """Base: a release could not be fetched; the running version is left alone."""

    class VerificationError(FetchError):  # type: ignore[no-redef]
        """The bytes on disk do not match the staged sha256 (after Transmission's own
        piece checks and repair attempts)."""

        def __init__(self, reason: str, *, expected: str, actual: str,
                     what: str = "sha256") -> None:
            super().__init__(reason)
            self.expected, self.actual, self.what = expected, actual, what

    class DiskFull(FetchError):  # type: ignore[no-redef]
        """Not enough space in the download directory (checked before adding, and reported
        by Transmission as ENOSPC while writing)."""

        def __init__(self, reason: str, *, directory: object) -> None:
            super().__init__(reason)
            self.directory = directory

    class DownloadError(FetchError):  # type: ignore[no-redef]
        """The download did not complete: timeout, cancel, daemon error, bad metainfo."""


class Cancelled(DownloadError):
    """``cancel`` was set while waiting; the torrent is left in the daemon (call
    :meth:`SwarmFetcher.remove` or :meth:`SwarmFetcher.prune` to drop it)."""


__all__ = ["Cancelled", "DiskFull", "DownloadError", "FetchError", "VerificationError"]
