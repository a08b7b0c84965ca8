"""Switches that run beside the agent's cycle (``deploy --host-parallel N``, docs/policy.md).

A switch (stop, repoint ``current``, start, health check, roll back on failure) takes
seconds; run inside the cycle, it kept every other service of the host waiting, so a host
never switched two services at once whatever ``host_parallel`` said. The
:class:`SwitchRunner` runs each switch in a thread of a small pool owned by the agent; the
agent's thread keeps cycling and hands a switch over only after the gate commit that the
pure decision (:func:`..decisions.host_room` and the rest of the gate) admitted.

What a switch thread does and does not do:

* it talks to supervisord through a client of its own (an XML-RPC client is not
  thread-safe), to the disk (its service's release dir, and the local state under the
  host's lock), to the health check and the metrics;
* it never touches the store: the agent's thread takes the finished switch
  (:meth:`SwitchRunner.take`) and does what follows it there (presence, leaving the ready
  queue, marking the item failed), so every store write still goes through the one
  coordinator on one thread;
* a switch in progress always finishes or rolls back: :meth:`SwitchRunner.shutdown`
  waits for it, and nothing else stops it.

Only the agent's thread calls :meth:`~SwitchRunner.submit`, :meth:`~SwitchRunner.busy`,
:meth:`~SwitchRunner.running`, :meth:`~SwitchRunner.take` and
:meth:`~SwitchRunner.shutdown`; the job table needs no lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..supervisorctl_client import Supervisor


class SwitchRunner:
    """At most one switch per service, at most ``workers`` at once (the decision admits
    fewer: ``host_parallel``). ``supervisor``: makes a supervisord client for a switch
    thread (None: the agent's own client is shared, e.g. a test's stand-in);
    ``wake``: called when a switch ends, so the agent's loop takes it at once."""

    def __init__(self, workers: int, supervisor: Callable[[], Supervisor] | None,
                 wake: Callable[[], None]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers),
                                        thread_name_prefix="dcdeploy-switch")
        self._jobs: dict[str, tuple[Future, int]] = {}
        self._make_client = supervisor
        self._local = threading.local()
        self._wake = wake

    def submit(self, svc: str, limit: int, job: Callable[[], Any]) -> None:
        """Run ``job`` (the switch of ``svc``, for an item allowing ``limit`` of the
        host's services down at once) in a switch thread."""
        if svc in self._jobs:
            raise ValueError(f"a switch of {svc} is already running")  # a bug: say so
        future = self._pool.submit(self._run, job)
        self._jobs[svc] = (future, limit)
        future.add_done_callback(lambda _: self._wake())

    def _run(self, job: Callable[[], Any]) -> Any:
        if self._make_client is not None and getattr(self._local, "sup", None) is None:
            self._local.sup = self._make_client()
        self._local.active = True
        return job()

    def busy(self) -> dict[str, int]:
        """{service: its item's host_parallel} for every switch not taken yet (running,
        or finished and waiting for the agent's thread): what :func:`decisions.host_room`
        counts. A finished one still counts until taken: its service is back in
        supervisord but not yet in the store."""
        return {svc: limit for svc, (_, limit) in self._jobs.items()}

    def running(self, svc: str) -> bool:
        job = self._jobs.get(svc)
        return job is not None and not job[0].done()

    def take(self, svc: str) -> Future | None:
        """The finished switch of ``svc`` (once), or None (none, or still running)."""
        job = self._jobs.get(svc)
        if job is None or not job[0].done():
            return None
        del self._jobs[svc]
        return job[0]

    def supervisor(self) -> Supervisor | None:
        """The calling switch thread's own supervisord client; None on any other thread
        or when clients are shared."""
        if not getattr(self._local, "active", False):
            return None
        return getattr(self._local, "sup", None)

    def shutdown(self) -> None:
        """Wait for every switch to end (done or rolled back); no thread is left."""
        self._pool.shutdown(wait=True)


__all__ = ["SwitchRunner"]
