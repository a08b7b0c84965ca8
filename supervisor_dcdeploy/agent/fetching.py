"""The agent's background downloads: one job at most per service, on a small thread pool.

The hand-off between threads is by immutable values only. The agent's thread starts and
forgets jobs (nothing else touches the job table); a fetch thread publishes how far it is
(:class:`~.status.FetchProgress`) and what preloading achieved
(:class:`~.status.PreloadStatus`) by replacing a value under a lock; the agent's thread
and the metrics thread read those values. No dict is mutated by two threads, and no
status is written by a fetch thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from ..localstate import ReleaseDir
from ..model import StagedRelease
from .config import AgentConfig
from .distribution import Distribution
from .status import FetchProgress, PreloadStatus


class FetchFailure(NamedTuple):
    """The last failed download of a service's staged release: paces retries, reports it."""

    sha256: str
    when: float  # time.monotonic()
    reason: str  # in full, for status.json
    public: str  # for the store: no digest or size learnt from the fetched bytes
    permanent: bool  # verified bytes that are an unsafe archive: never retried for this sha
    kind: str  # "verify": the bytes are not a usable release; "fetch": network, disk...
    swarm_error: str | None = None  # the swarm failed first, then the URLs (the reason above)


class FetchJob(NamedTuple):
    """A download started for one staged release (by its sha256)."""

    sha256: str
    future: Future

    def running(self) -> bool:
        return not self.future.done()


class FetchManager:
    """This host's downloads. ``start``, ``job``, ``forget`` and ``shas`` are for the
    agent's thread only; ``progress``, ``preload`` and ``progress_json`` may be called
    from any thread."""

    def __init__(self, cfg: AgentConfig, dist: Distribution | None, wake: Callable[[], None],
                 log: Any, fetch: Callable[..., Any] | None = None, workers: int = 2) -> None:
        self.cfg = cfg
        self.dist = dist
        self.wake = wake
        self.log = log
        self._inject = fetch  # tests: replaces the download (swarm or URL) itself
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        self._jobs: dict[str, FetchJob] = {}
        self._lock = threading.Lock()  # guards the two tables of published values below
        self._progress: dict[str, FetchProgress] = {}
        self._preload: dict[str, PreloadStatus] = {}
        # Read here, not from the swarm part: a host that fetches over HTTP only pins
        # what its agent.conf asks for too (the key was ignored without a swarm engine).
        self.mlock_cap = int(cfg.extra.get("mlock_cap", "0") or 0)
        self._warmed: dict[str, Path] = {}  # svc -> the release path its locks are held for

    # -- the agent's thread ---------------------------------------------------------------
    def start(self, svc: str, staged: StagedRelease, rd: ReleaseDir, preload: bool,
              transport: str) -> None:
        """Start downloading ``staged`` for ``svc`` (replacing a finished job)."""
        self._publish_progress(svc, FetchProgress(transport))
        future = self._executor.submit(self._run, svc, staged, rd, preload, transport)
        self._jobs[svc] = FetchJob(staged.sha256, future)

    def job(self, svc: str) -> FetchJob | None:
        return self._jobs.get(svc)

    def forget(self, svc: str) -> None:
        self._jobs.pop(svc, None)

    def busy(self, svc: str) -> bool:
        """Whether a download for ``svc`` is still running."""
        job = self._jobs.get(svc)
        return job is not None and job.running()

    def shas(self) -> set[str]:
        """The sha256 of every job's release (their archives stay in the cache)."""
        return {job.sha256 for job in self._jobs.values()}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- any thread ---------------------------------------------------------------------
    def progress(self, svc: str) -> FetchProgress | None:
        with self._lock:
            return self._progress.get(svc)

    def preload(self, svc: str) -> PreloadStatus | None:
        with self._lock:
            return self._preload.get(svc)

    def progress_json(self) -> dict[str, dict[str, Any]]:
        """{service: progress} for the metrics (a copy)."""
        with self._lock:
            return {svc: p.to_json() for svc, p in self._progress.items()}

    def _publish_progress(self, svc: str, progress: FetchProgress) -> None:
        with self._lock:
            self._progress[svc] = progress

    # -- a fetch thread -----------------------------------------------------------------
    def _run(self, svc: str, staged: StagedRelease, rd: ReleaseDir, preload: bool,
             transport: str) -> None:
        """Download (swarm or URL, see ``fetch_transport``), verify, install, then warm the
        page cache when the spec asks for it. The host joins the ready queue only after all
        of it. A swarm download that fails for any reason but a full disk or a wrong
        checksum is retried from the URLs, when there are some. Raises what the download
        raised (the reconciler reads it from the job's future)."""
        from ..fetch import DiskFull, DownloadError, VerificationError, install_release
        via = transport
        swarm_error: str | None = None  # published with the progress: status.json shows it

        def progress(done: int, total: int | None) -> None:
            self._publish_progress(svc, FetchProgress(via, done, total, swarm_error))

        try:
            if self._inject is not None:
                self._inject(svc, staged, rd, progress)
                transport = "injected"
            if transport == "swarm" and self.dist is not None:
                try:
                    self.dist.fetch(staged, rd.path(staged.version), progress)
                except (DiskFull, VerificationError):
                    raise
                except DownloadError as exc:
                    if not staged.urls:
                        raise
                    self.log.warning("fetch.swarm_failed", svc=svc, version=staged.version,
                                     error=str(exc), action="download from the URLs")
                    transport = via = "http"
                    swarm_error = str(exc)
                    self._publish_progress(svc, FetchProgress(via, swarm_error=swarm_error))
            if transport == "http" and staged.urls:
                from ..fetch import Limits
                # The staged size (required, signed) bounds the download byte for byte.
                install_release(list(staged.urls), staged.sha256, rd.releases, staged.version,
                                rd.cache, size=staged.size,
                                file_root=self.cfg.extra.get("file_root") or None,
                                limits=Limits.from_config(self.cfg.extra), progress=progress)
            elif transport == "http":
                raise DownloadError("the staged release has only a torrent and this host has "
                                    "no swarm engine in its agent.conf (transmission_rpc or "
                                    "swarm_engine = libtorrent)")
            target = rd.path(staged.version)
            if preload:
                from ..p2p.warm import warm
                result = warm(target, mlock_cap=self.mlock_cap)
                with self._lock:
                    self._preload[svc] = PreloadStatus(
                        result.bytes_total, result.bytes_resident, result.bytes_locked,
                        result.mlock_error)
                self.log.info("preload.done", svc=svc, version=staged.version,
                              resident=result.bytes_resident, total=result.bytes_total,
                              locked=result.bytes_locked, mlock_error=result.mlock_error)
            self._release_pins(svc, target if preload else None)
        finally:
            self.wake()

    def _release_pins(self, svc: str, warmed: Path | None) -> None:
        """The release just installed supersedes the one warmed before for ``svc``: unpin
        that one, or every deploy would add ``mlock_cap`` bytes (pruned releases' deleted
        files included) until the agent restarts. One job per service at a time, so only
        this thread touches this service's entry."""
        with self._lock:
            previous = self._warmed.pop(svc, None)
            if warmed is not None:
                self._warmed[svc] = warmed
        if previous is not None and previous != warmed:
            from ..p2p.warm import unlock
            unlock(previous)


__all__ = ["FetchFailure", "FetchJob", "FetchManager"]
