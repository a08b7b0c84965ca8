"""One service on one host: the reconcile step (docs/design.md §4).

A :class:`ServiceReconciler` holds everything this host remembers about one service
between cycles (the last trusted view, the pending failure mark, the recovery back-off, the
last download failure, the last switch's timings, its status). Its
:meth:`~ServiceReconciler.reconcile` reads the coordinator's view, asks the pure functions
in :mod:`..decisions`, :mod:`..canary` and :mod:`..peers` what to do, and does it
(register, fetch, join the ready queue, hold or roll back a canary, verify peers, pass the
gate and switch, recover, complete). What
the services of a host share (the store's coordinator and session, supervisord, the local
state file, the trust counters, the downloads) comes in a :class:`HostContext`.

Rules kept here, in one place:

* store not CONNECTED (suspended, lost, down): nothing destructive starts; a service that is
  not running is started from local state (L3); running services are left alone.
* a take-down happens only through the gate transaction, after ``sync()`` and a fresh read.
* a switch that started is always finished or rolled back locally, store or no store.
* a switch runs in a thread of the agent's :class:`~.switches.SwitchRunner`, so that up to
  ``host_parallel`` services of the host switch at once; the cycle goes on meanwhile,
  leaves that service alone until the switch ends, and then does the store's part of it
  (presence, ready queue, failure mark) on the agent's thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import canary, decisions, health, peers, trust
from ..coord import Coordinator
from ..localstate import LocalState, ReleaseDir
from ..metrics import AgentMetrics
from ..model import DeployItem, InvalidData, ServiceSpec
from ..store import StoreError, TransactionFailed, layout
from ..supervisorctl_client import Supervisor, SupervisorError
from .config import AgentConfig
from .distribution import Distribution, fetch_transport
from .fetching import FetchFailure, FetchManager
from .status import FetchStatus, ServiceStatus, VerifyPeersStatus
from .switches import SwitchRunner

RUNNING_STATES = ("RUNNING",)
TRANSIENT_STATES = ("STARTING", "STOPPING", "BACKOFF")
FETCH_RETRY_SECS = 10.0
RECOVER_RETRY_SECS = 5.0
# Completing an item needs every presence's version; the host that switched last reads
# them. Others do only when the item is still open this long after the queue emptied (the
# last switcher died mid-switch): short enough that a dead host does not hold the deploy
# (L2 is judged 20 s after every reachable host runs the target), long enough that a
# normal last switch (start + healthy_secs) ends first and nobody else reads.
COMPLETE_FALLBACK_SECS = 10.0
CANARY_CHECK_SECS = 1.0  # a canary checks its own health this often during the hold


@dataclass
class HostContext:
    """What the reconcilers of one host share. ``coord`` may be replaced by the agent (a
    backend that cannot follow falls back to re-reading); ``connected`` reads the store
    session's state at the moment it is asked; ``wake_by`` asks the agent's loop to run
    the next cycle no later than a ``time.time()`` (a canary's soak ending, say).
    ``switches`` runs switches beside the cycle (None: inside it, one at a time);
    ``state_lock`` guards the local state file, which switch threads write too."""

    cfg: AgentConfig
    log: Any
    sup: Supervisor
    local: LocalState
    counters: trust.CounterLog
    metrics: AgentMetrics
    fetches: FetchManager
    dist: Distribution | None
    coord: Coordinator
    wake: Callable[[], None]
    connected: Callable[[], bool]
    wake_by: Callable[[float], None]
    switches: SwitchRunner | None = None
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    # supervisord's program states, read in one call at the start of the cycle (None:
    # each service asks for its own program): see ServiceReconciler._program_state.
    states: dict[str, str] | None = None

    @property
    def host(self) -> str:
        return self.cfg.host


class ServiceReconciler:
    """One service on this host. All methods run on the agent's thread, except
    :meth:`switch` (and what it calls), which runs in a switch thread while the cycle leaves
    this service alone; :meth:`set` may be called from both."""

    def __init__(self, svc: str, ctx: HostContext) -> None:
        self.svc = svc
        self.ctx = ctx
        self.rd = ReleaseDir(ctx.cfg.root, svc)
        self.status = ServiceStatus()
        self.view: decisions.ServiceView | None = None  # the last trusted view read
        self.staged_version: str | None = None  # the last staged version seen (kept on disk)
        self.refused: tuple[str, ...] = ()  # operator data refused in the last view
        self.fetch_failed: FetchFailure | None = None
        self.pending_fail: tuple[str, str] | None = None  # (item node, reason) to mark
        self.recover_after = 0.0  # time.monotonic() before which recovery is not retried
        self.switched = False  # this host just switched: it completes the item
        self.queue_empty_since: float | None = None
        self.switch_timing: dict[str, Any] | None = None  # the last switch's, for presence
        self.hold_since: tuple[str, float] | None = None  # (version, start) of a resumed hold
        self.start_mark: float | None = None  # time.monotonic() of the last program start
        self._status_lock = threading.Lock()

    # -- status -----------------------------------------------------------------------
    def set(self, **fields: Any) -> None:
        """Change fields of this service's status (a new value; readers keep the old). Most
        cycles repeat what the status says: then the value is kept, not copied."""
        with self._status_lock:  # the agent's thread and this service's switch thread
            current = self.status
            if any(getattr(current, name) != value for name, value in fields.items()):
                self.status = replace(current, **fields)

    def snapshot(self) -> ServiceStatus:
        """The status with what the fetch thread published since (preloading)."""
        preload = self.ctx.fetches.preload(self.svc)
        return self.status if preload is None else replace(self.status, preload=preload)

    def published_fetch(self) -> dict[str, Any]:
        """For ``/dc/hosts/<host>``: a failed download (also while it is retried: its last
        error) with the error meant for the store; {} otherwise."""
        fetch = self.status.fetch
        if fetch is None or not fetch.failed():
            return {}
        entry = {k: v for k, v in fetch.to_json().items()
                 if k in ("version", "state", "error", "kind")}
        failed = self.fetch_failed
        if failed and entry.get("error") == failed.reason:  # no digest or size learnt
            entry["error"] = failed.public
        return entry

    # -- one step ---------------------------------------------------------------------
    def reconcile(self, queue: list[DeployItem] | None, queue_invalid: list[str],
                  store_state: str) -> None:
        """One reconcile step. ``queue`` is None when the store cannot be used this cycle
        (``store_state`` says why): then only local state decides. Raises what the store,
        supervisord or the disk raised; the agent reports it and goes on."""
        svc, ctx = self.svc, self.ctx
        fresh = False
        if ctx.switches is not None:
            if ctx.switches.running(svc):
                return  # its switch thread has it until the switch ends
            done = ctx.switches.take(svc)
            if done is not None:
                self._finish_switch(done.result())  # raises what the switch raised
                fresh = True
        st = ctx.local.get(svc)
        rd = self.rd
        view = None
        if queue is not None:
            # No herd (docs/design.md §4.6): only hosts that may pass the gate now watch
            # current and the gate; the others watch the queue entries just ahead of them.
            view = self._trusted(ctx.coord.view(svc, queue, queue_invalid))
            if view.spec is not None and view.spec.to_json().decode() != st.spec:
                self._record(spec=view.spec.to_json().decode())
                st = ctx.local.get(svc)
            self.view = view
            self.set(store="connected", invalid=tuple(view.invalid) or None)
            if view.staged is not None:
                self.staged_version = view.staged.version
        else:
            self.set(store=store_state)
        spec = self._spec(view)
        program = spec.program if spec else svc
        state = self._program_state(program, fresh)
        self.set(program=program, process=state, version=st.active)

        if state in TRANSIENT_STATES:
            return
        if state not in RUNNING_STATES:
            if view is not None and ctx.host in view.current:
                self._unregister()  # not serving: stop counting as online at once
            if view is not None and canary.failed_in_hold(view, ctx.host, st.active,
                                                          time.time()):
                self._canary_failed(view, f"process is {state}")
            self.recover(program, spec, view)
            return
        if st.active is None or st.active != rd.active():
            # Adopt what runs (first start of the agent on a host set up by hand).
            self._record(active=rd.active(), verified=True)
            st = ctx.local.get(svc)
        if not st.verified:
            self._resume_hold(st.active, spec)
            st = ctx.local.get(svc)
        if view is None:
            self.set(phase="serving", reason="store unreachable: serving the last "
                                             "known version, starting nothing")
            return
        if view.spec is None:
            refused = [r for r in self.refused if r.startswith(f"{layout.service(svc)}:")]
            self.set(phase="serving", reason=refused[0] if refused else
                     f"service {svc} is not defined in the store")
            return
        # A check this host cannot run (it names a local check or port variable that its
        # agent.conf lacks) is reported every cycle; the gate below refuses to switch on it.
        self.set(health_problem=health.problem(view.spec.health, ctx.cfg.health(svc)))
        self.retry_pending_failure()
        self.ensure_presence(view, st.active, spec)
        self.prefetch(view)
        # host_parallel: while this host switches as many of its services as it may, it
        # stays out of this service's ready queue (it would hold a place at the front that
        # it cannot use) and joins again, at the back, when a switch ends.
        room = decisions.host_room(view, self._busy())
        if self.enqueue(view, st.active, room.ok):
            # Decide on the queue with our new entry (the coordinator holds it already),
            # not a cycle later: a host back from another service's switch is often
            # first in line at once (bench/waves.py: most handoffs at 4 hosts).
            view = self._trusted(ctx.coord.view(svc, queue, queue_invalid))
            self.view = view
        if canary.needs_choice(view):
            view = ctx.coord.resolve(svc, view)
        hold = canary.hold(view, ctx.host, time.time())
        decision = canary.gate_decision(hold, ctx.host, st.active)
        if not room and (decision or decisions.rollout_target(view)[0] not in (None,
                                                                              st.active)):
            decision = room  # the reason too: out of the queue for host_parallel
        self.set(phase="serving", reason=decision.reason)
        self._arm_queue_watches(hold.view, st.active)
        if self._canary_upkeep(program, view, hold):
            return
        if not decision and room and hold.refusal is None and \
                peers.verify_peers(view.spec) and peers.slot_held_by_online(hold.view, ctx.host):
            # A host ahead still has a presence: if it is dead, probing frees its slot
            # (a cheap look at those hosts first; the gate then probes for the quorum).
            resolved = ctx.coord.resolve(svc, hold.view)
            if peers.any_silent(resolved, peers.online_ahead(resolved, ctx.host)):
                decision = decisions.Decision(True, "a host ahead in the queue is silent")
        if decision:
            self.pass_gate_and_switch(program, view.spec)
        else:
            self.maybe_complete(view)

    def _resume_hold(self, version: str | None, spec: ServiceSpec | None) -> None:
        """The active version runs but was never recorded verified: this agent was killed or
        stopped in its switch's hold. Hold it again, one check a cycle, and record it
        verified once it has stayed healthy for ``healthy_secs`` (decisions.resumed_hold)."""
        if version is None or spec is None:
            return
        problem = health.probe(spec.health, self.ctx.cfg.health(self.svc))
        since = self.hold_since[1] if self.hold_since and self.hold_since[0] == version \
            else None
        since, verified = decisions.resumed_hold(since, problem is None, time.monotonic(),
                                                 spec.healthy_secs)
        self.hold_since = (version, since) if since is not None else None
        if verified:
            self._record(verified=True)
            self.hold_since = None
            self.ctx.log.info("hold.resumed_done", svc=self.svc, version=version)
        else:
            self.ctx.wake_by(time.time() + max(0.2, spec.healthy_secs / 4))

    def _trusted(self, view: decisions.ServiceView) -> decisions.ServiceView:
        """The view with only the operator data this host trusts (trust.check_all):
        refused specs and staged releases are left out, a refused deploy item blocks the
        queue at its place. Refusals go to status.json and the host registry."""
        ctx = self.ctx
        spec, staged, queue, refused, counters = trust.check_all(
            view.spec, view.staged, view.queue, ctx.cfg.trust_policy, time.time(),
            ctx.counters.seen)
        try:
            ctx.counters.record(counters)
        except OSError as exc:  # kept in memory; a full disk must not stop the cycle
            ctx.log.error("trust.counters_write_failed", error=str(exc))
            self.set(error=f"cannot write {ctx.counters.path}: {exc.strerror or exc}")
        for reason in refused:
            if reason not in self.refused:
                ctx.log.error("trust.refused", svc=self.svc, refused=reason)
        self.refused = tuple(refused)
        self.set(refused=tuple(refused) or None)
        return replace(view, spec=spec, staged=staged, queue=queue)

    # -- presence ---------------------------------------------------------------------
    def ensure_presence(self, view: decisions.ServiceView, version: str | None,
                        spec: ServiceSpec | None) -> None:
        entry = view.current.get(self.ctx.host)
        if version is None or (entry is not None and entry.version == version):
            return
        if entry is None and spec is not None:
            problem = health.probe(spec.health, self.ctx.cfg.health(self.svc))
            if problem:
                self.set(reason=f"running but unhealthy, not registered: {problem}")
                return
        self._register(version)

    def _presence(self, version: str) -> dict:
        """What our presence carries besides the version: the timing of the switch that
        brought us to it, and where other hosts can probe us (docs/policy.md)."""
        timing = self.switch_timing
        return {"switch": timing if timing and timing["version"] == version else None,
                "probe": peers.probe_target(self._spec(self.view), self.ctx.cfg, self.svc)}

    def _register(self, version: str) -> None:
        self.ctx.coord.register(self.svc, version, self.ctx.cfg.rack,
                                **self._presence(version))
        self.ctx.log.info("presence.registered", svc=self.svc, version=version)

    def _unregister(self) -> None:
        self.ctx.coord.unregister(self.svc)
        self.ctx.log.info("presence.removed", svc=self.svc)

    # -- prefetch and the ready queue -------------------------------------------------
    def prefetch(self, view: decisions.ServiceView) -> None:
        staged = view.staged
        if staged is None:
            return
        from ..fetch import installed_sha256
        svc, ctx, fetches = self.svc, self.ctx, self.ctx.fetches
        have = installed_sha256(self.rd.path(staged.version))
        if have == staged.sha256:
            progress = fetches.progress(svc)  # how this agent fetched it
            self.set(fetch=FetchStatus(staged.version, "installed",
                                       via=progress.via if progress else None,
                                       swarm_error=progress.swarm_error if progress else None))
            return
        if have is not None:
            self.set(fetch=FetchStatus(
                staged.version, "error", kind="verify",
                error=f"version {staged.version} is installed here with sha256 "
                      f"{have[:12]}..., the staged one is {staged.sha256[:12]}...: stage a "
                      "new version number"))
            return
        job = fetches.job(svc)
        failed = self.fetch_failed
        # A retry keeps the last failure in view (dcdeploy status: "N hosts failed to verify").
        last_error: dict[str, Any] = {"error": failed.reason, "kind": failed.kind} \
            if failed and failed.sha256 == staged.sha256 else {}
        if job and job.sha256 == staged.sha256 and job.running():
            progress = fetches.progress(svc)
            self.set(fetch=FetchStatus(staged.version, "downloading",
                                       **(progress.to_json() if progress else {}),
                                       **last_error))
            return
        if job and job.sha256 == staged.sha256 and not job.running():
            fetches.forget(svc)
            exc = job.future.exception()
            if exc is not None:
                from ..fetch import FetchError, UnsafeArchive, VerificationError
                reason = str(exc)
                public = exc.public_reason if isinstance(exc, FetchError) else reason
                bad_bytes = isinstance(exc, (VerificationError, UnsafeArchive))
                progress = fetches.progress(svc)
                swarm_error = progress.swarm_error if progress else None
                if swarm_error:  # both ways failed: say so (the store has one error field)
                    first = f"; the swarm download had failed first: {swarm_error}"
                    reason, public = reason + first, public + first
                self.fetch_failed = FetchFailure(
                    staged.sha256, time.monotonic(), reason, public,
                    permanent=isinstance(exc, UnsafeArchive),
                    kind="verify" if bad_bytes else "fetch", swarm_error=swarm_error)
                ctx.log.error("fetch.failed", svc=svc, version=staged.version, error=str(exc),
                              kind=type(exc).__name__)
            else:
                ctx.log.info("fetch.installed", svc=svc, version=staged.version)
                ctx.wake()
                return
        failed = self.fetch_failed
        if failed and failed.sha256 == staged.sha256 and \
                (failed.permanent or time.monotonic() - failed.when < FETCH_RETRY_SECS):
            self.set(fetch=FetchStatus(staged.version, "failed", error=failed.reason,
                                       kind=failed.kind, swarm_error=failed.swarm_error))
            return
        hosts = max(len(view.current), sum(svc in h.services for h in view.hosts.values()))
        transport = fetch_transport(staged, hosts, ctx.dist.link_bps if ctx.dist else 0,
                                    ctx.dist is not None)
        ctx.log.info("fetch.start", svc=svc, version=staged.version, urls=list(staged.urls),
                     via=transport, hosts=hosts)
        preload = bool(view.spec and view.spec.preload)
        fetches.start(svc, staged, self.rd, preload, transport)
        self.set(fetch=FetchStatus(staged.version, "downloading", **last_error))

    def enqueue(self, view: decisions.ServiceView, active: str | None,
                room: bool = True) -> bool:
        """Join the ready-to-roll queue for the staged version once it is installed and
        verified here; leave entries for any other version, and every entry while the host
        has no ``room`` for another switch (host_parallel). True when it joined now."""
        from ..fetch import installed_sha256
        staged = view.staged
        want = None
        if room and staged is not None and staged.version != active and \
                not self.ctx.fetches.busy(self.svc) and \
                installed_sha256(self.rd.path(staged.version)) == staged.sha256:
            want = staged.version  # installed, verified and (with preload) warm
        mine = [e for e in view.staging if e.host == self.ctx.host]
        for entry in mine:
            if entry.version != want:
                self.ctx.coord.drop_entry(self.svc, entry.node)
        if want is not None and not any(e.version == want for e in mine):
            node = self.ctx.coord.enter_queue(self.svc, want, self.ctx.cfg.rack)
            self.ctx.log.info("staging.enqueued", svc=self.svc, version=want, node=node)
            return True
        return False

    def _arm_queue_watches(self, view: decisions.ServiceView, active: str | None) -> None:
        """A host at position p >= k of the ready queue can only become eligible after one
        of the k entries just ahead of it leaves (pigeonhole): watch those, nothing else."""
        coord = self.ctx.coord
        target, _ = decisions.rollout_target(view)
        queue = decisions.ready_queue(view, target) if target else []
        hosts = [e.host for e in queue]
        k = decisions.watch_width(view)
        if target is None or active == target or self.ctx.host not in hosts:
            coord.set_front(self.svc, target is not None and active != target)
            return
        position = hosts.index(self.ctx.host)
        coord.set_front(self.svc, position < k)
        if position >= k:
            coord.wait_ahead(self.svc, [e.node for e in queue[position - k: position]])

    def _leave_queue(self) -> None:
        self.ctx.coord.leave_queue(self.svc)

    # -- the gate and the switch ------------------------------------------------------
    def pass_gate_and_switch(self, program: str, spec: ServiceSpec) -> None:
        svc, ctx = self.svc, self.ctx
        if not ctx.connected():
            return
        fresh = self._trusted(ctx.coord.fresh_view(svc))  # as fresh as sync() makes it
        active = ctx.local.get(svc).active
        if canary.needs_choice(fresh):
            fresh = ctx.coord.resolve(svc, fresh)
        hold = canary.hold(fresh, ctx.host, time.time())
        decision = canary.gate_decision(hold, ctx.host, active)
        silent: tuple[str, ...] = ()
        if fresh.spec is not None and peers.verify_peers(fresh.spec) and \
                hold.refusal is None and (decision or peers.slot_held_by_online(hold.view,
                                                                                ctx.host)):
            fresh = ctx.coord.resolve(svc, fresh)
            decision, silent = self._verify_peers(fresh, hold)
        busy = self._busy()
        room = decisions.host_room(fresh, busy)  # with the limit of the item read here
        if decision and not room:
            decision = room
        if not decision:
            self.set(reason=decision.reason)  # the synced read overrules the cycle's
            return
        target, _ = decisions.rollout_target(fresh)
        assert target is not None and fresh.staged is not None and fresh.spec is not None
        from ..fetch import installed_sha256
        if installed_sha256(self.rd.path(target)) != fresh.staged.sha256:
            return  # S3: never start bytes that do not match the staged sha256
        head = fresh.head
        unusable = health.problem(fresh.spec.health, ctx.cfg.health(svc))
        if unusable is not None:
            # Stopping what runs for a release this host could never verify would only
            # end in a rollback: keep serving, and fail the item with the reason instead.
            reason = f"host {ctx.host}: cannot check {target}: {unusable}"
            self.set(phase="serving", reason=reason, last_failure=reason)
            if head is not None and self.pending_fail is None:
                self.pending_fail = (head.node, reason)
                self.retry_pending_failure()
            return
        gate = {"host": ctx.host,
                "online": decisions.online_count(peers.without(fresh, silent)),
                "was_online": ctx.host in fresh.current,
                "quorum": fresh.spec.quorum, "version": target,
                "item": head.node if head else None, "t": time.time()}
        if silent:
            gate["silent"] = list(silent)  # presences that did not answer: not counted
        try:
            ctx.coord.try_gate(svc, fresh, gate, head, record=hold.record)
        except TransactionFailed as exc:
            ctx.log.info("gate.contended", svc=svc, op=exc.index, error=str(exc.cause))
            ctx.wake()
            return
        ctx.log.info("gate.passed", svc=svc, version=target, online=gate["online"],
                     quorum=gate["quorum"], item=gate["item"], canaries=list(hold.canaries),
                     recorded=list(hold.record), why=decision.reason)
        limit = decisions.host_parallel(fresh)
        if len(busy) + 1 >= min([limit, *busy.values()]):
            try:  # no room left until a switch is over: give up its places in other queues
                ctx.coord.make_way(svc, in_progress=busy)
            except StoreError as exc:  # only a courtesy to the next host in line
                ctx.log.warning("queue.make_way_failed", svc=svc, error=str(exc))
        self._launch(program, fresh.spec, target, head.node if head else None, limit)

    def _busy(self) -> dict[str, int]:
        """{service: its item's host_parallel} of this host's switches not over yet."""
        return self.ctx.switches.busy() if self.ctx.switches is not None else {}

    def _launch(self, program: str, spec: ServiceSpec, target: str, item: str | None,
                limit: int) -> None:
        """Run the switch in a switch thread (after the gate commit); the cycle goes on
        and, once it ended, :meth:`_finish_switch` does its store part."""
        runner = self.ctx.switches
        if runner is not None:
            self.set(phase="switching",
                     reason=f"{self.ctx.local.get(self.svc).active} -> {target}")
            try:
                runner.submit(self.svc, limit, lambda: self.switch(program, spec, target, item))
                return
            except RuntimeError:  # the agent is stopping: switch here, as it used to
                pass
        self._finish_switch(self.switch(program, spec, target, item))

    def _finish_switch(self, outcome: tuple[str, str | None]) -> None:
        """The store's part of an ended switch, on the agent's thread: back in presence
        and out of the ready queue; after a failure, the item marked failed (retried
        every cycle until the store takes it) and the old version registered again."""
        what, version = outcome
        if what == "failed":
            self._after_failure(version)
            return
        if version is not None:
            self._after_switch(version)
        if what == "done":
            self._prune()

    def _program_state(self, program: str, fresh: bool) -> str:
        """``program``'s state: from the cycle's one read of every program, unless
        ``fresh`` (its switch ended since that read: only the switch thread stops and
        starts a program outside the agent's thread) or it is not in that read (then
        supervisord's own answer, or its error naming the program)."""
        states = self.ctx.states
        if fresh or states is None or program not in states:
            return self.ctx.sup.state(program)
        return states[program]

    def _sup(self) -> Supervisor:
        """supervisord's client for the calling thread (a switch thread has its own)."""
        runner = self.ctx.switches
        own = runner.supervisor() if runner is not None else None
        return own if own is not None else self.ctx.sup

    def switch(self, program: str, spec: ServiceSpec, target: str,
               item: str | None) -> tuple[str, str | None]:
        """Stop, repoint ``current``, start, health-check; roll back on failure. No store
        I/O (it may run in a switch thread): returns what :meth:`_finish_switch` does with
        the store, ("done", target), ("not_started", previous) or ("failed", previous)."""
        svc, ctx = self.svc, self.ctx
        sup = self._sup()
        rd = self.rd
        previous = ctx.local.get(svc).active
        self.set(phase="switching", reason=f"{previous} -> {target}")
        ctx.log.info("switch.start", svc=svc, version=target, previous=previous)
        started = time.monotonic()
        back: Path | None = None
        prepared: Path | None = None
        try:
            prepared = rd.prepare_current(target)
            # The way back is made now too, so that a rollback on a disk that filled up
            # meanwhile needs no new directory entry: it is a rename.
            if previous is not None and previous != target and rd.path(previous).is_dir():
                back = rd.prepare_current(previous)
        except OSError as exc:
            # Nothing is stopped yet: give the slot back by registering again.
            if prepared is not None:
                prepared.unlink(missing_ok=True)
            ctx.log.error("switch.not_started", svc=svc, version=target, error=str(exc))
            self.set(phase="serving", error=f"cannot prepare the switch: {exc}")
            return "not_started", previous
        sup.stop(program)
        rd.commit_current(prepared)
        stopped = time.monotonic()
        self._record(active=target, previous=previous, verified=False)
        problem = self._start_and_check(program, spec, hold=True)
        if problem is None:
            healthy = time.monotonic()
            mark = self.start_mark if self.start_mark is not None else healthy
            up = max(stopped, min(mark, healthy))
            self.switch_timing = {"version": target, "stop_s": round(stopped - started, 3),
                                  "start_s": round(up - stopped, 3),
                                  "healthy_s": round(healthy - up, 3), "at": time.time()}
            self._record(verified=True)
            if back is not None:
                back.unlink(missing_ok=True)
            ctx.log.info("switch.done", svc=svc, version=target)
            ctx.metrics.on_switch(svc, time.monotonic() - started, "ok")
            return "done", target
        ctx.log.error("switch.failed", svc=svc, version=target, reason=problem)
        sup.stop(program)
        if previous is not None:
            ctx.metrics.on_rollback(svc)
            try:
                if back is not None:
                    rd.commit_current(back)
                else:
                    rd.point_current(previous)
            except OSError as exc:
                ctx.log.error("switch.repoint_failed", svc=svc, error=str(exc))
            self._record(active=previous, previous=None, verified=False)
            again = self._start_and_check(program, spec, hold=False)
            if again is None:
                self._record(verified=True)
                ctx.log.info("switch.rolled_back", svc=svc, version=previous)
            else:
                ctx.log.error("switch.rollback_failed", svc=svc, version=previous,
                              reason=again)
        ctx.metrics.on_switch(svc, time.monotonic() - started,
                              "rolled_back" if previous is not None else "failed")
        reason = f"host {ctx.host}: {target} failed its health check: {problem}"
        self.set(phase="failed", reason=reason, last_failure=reason)
        if item is not None:
            self.pending_fail = (item, reason)
        return "failed", previous

    def _after_switch(self, version: str) -> None:
        self.switched = True
        try:
            # Register and leave the ready queue (one commit where the backend can).
            self.ctx.coord.rejoin(self.svc, version, self.ctx.cfg.rack,
                                  **self._presence(version))
            self.ctx.log.info("presence.registered", svc=self.svc, version=version)
        except StoreError as exc:
            # The next cycle registers again (presence is checked every cycle).
            self.ctx.log.warning("presence.deferred", svc=self.svc, error=str(exc))
        self.ctx.wake()

    def _after_failure(self, previous: str | None) -> None:
        try:
            self.retry_pending_failure()
            if previous is not None and self.ctx.local.get(self.svc).verified:
                self._register(previous)
            self._leave_queue()
        except StoreError as exc:
            self.ctx.log.warning("failure.report_deferred", svc=self.svc, error=str(exc))

    def retry_pending_failure(self) -> None:
        """Mark the deploy item failed (CAS), retried every cycle until the store takes it."""
        if self.pending_fail is None:
            return
        node, reason = self.pending_fail
        if self.ctx.coord.mark_failed(node, reason):
            self.ctx.log.error("deploy.failed", svc=self.svc, item=node, reason=reason)
        self.pending_fail = None

    def _start_and_check(self, program: str, spec: ServiceSpec | None,
                         hold: bool) -> str | None:
        sup = self._sup()
        try:
            sup.start(program)
        except SupervisorError as exc:
            return str(exc)
        self.start_mark = time.monotonic()
        if spec is None:
            return None

        def alive() -> str | None:
            state = sup.state(program)
            return None if state in ("RUNNING", "STARTING") else f"process is {state}"

        problem = health.wait_healthy(spec.health, self.ctx.cfg.health(self.svc),
                                      start_timeout=self.ctx.cfg.start_timeout,
                                      healthy_secs=spec.healthy_secs if hold else 0.0,
                                      alive=alive)
        if problem is not None:
            self.ctx.metrics.on_health_failure(self.svc)
        return problem

    def _prune(self) -> None:
        st = self.ctx.local.get(self.svc)
        protect = {v for v in (st.active, st.previous, self.staged_version) if v}
        removed = self.rd.prune(self.ctx.cfg.keep_releases, protect)
        if removed:
            self.ctx.log.info("releases.pruned", svc=self.svc, versions=removed)

    # -- canaries and verified peers (issue 10; logic in canary.py, peers.py) ---------
    def _canary_upkeep(self, program: str, view: decisions.ServiceView,
                       hold: canary.Hold) -> bool:
        """During a canary hold: a canary checks its own health every CANARY_CHECK_SECS
        and fails the item (rollback) on a failure; the last canary stamps the soak's
        start. After such a failure, each canary goes back through the gate. True when
        this cycle switched or failed something (the caller stops there)."""
        svc, ctx = self.svc, self.ctx
        now = time.time()
        if hold.holding and hold.soak_ends is not None:
            ctx.wake_by(hold.soak_ends)
        st = ctx.local.get(svc)
        head = view.head
        assert view.spec is not None
        if head is not None and canary.soaking(view, ctx.host, now):
            ctx.wake_by(now + CANARY_CHECK_SECS)
            problem = health.probe(view.spec.health, ctx.cfg.health(svc))
            if problem is not None:
                self._unregister()  # it does not serve properly: not online any more
                self._canary_failed(view, problem)
                return True
            if head.canaries_done_at is None and \
                    canary.should_stamp(ctx.coord.resolve(svc, view)):
                if ctx.coord.stamp_canaries_done(head.node, head.version):
                    ctx.log.info("canary.soak_started", svc=svc, item=head.node)
        back = canary.may_roll_back(view, ctx.host, st.active, st.previous)
        if back:  # a rollback is a take-down too: within host_parallel
            back = decisions.host_room(view, self._busy())
            if not back:
                self.set(reason=f"canary rollback waits: {back.reason}")
        if back:
            fresh = self._trusted(ctx.coord.fresh_view(svc))
            back = canary.may_roll_back(fresh, ctx.host, st.active, st.previous)
            if not back:
                return False
            gate = {"host": ctx.host, "online": decisions.online_count(fresh),
                    "was_online": ctx.host in fresh.current, "rollback": True,
                    "quorum": fresh.spec.quorum if fresh.spec else 0,
                    "version": st.previous, "item": fresh.head.node if fresh.head else None,
                    "t": time.time()}
            try:
                ctx.coord.try_gate(svc, fresh, gate, fresh.head)
            except TransactionFailed as exc:
                ctx.log.info("gate.contended", svc=svc, op=exc.index, error=str(exc.cause))
                ctx.wake()
                return True
            ctx.log.info("canary.rolling_back", svc=svc, version=st.previous)
            assert st.previous is not None
            self._launch(program, view.spec, st.previous, None, decisions.host_parallel(fresh))
            return True
        return False

    def _canary_failed(self, view: decisions.ServiceView, problem: str) -> None:
        """Fail the item with rollback: every canary goes back (the next cycles)."""
        head = view.head
        assert head is not None
        reason = (f"canary {self.ctx.host}: {head.version} failed its health check during "
                  f"the soak: {problem}")
        self.set(phase="failed", reason=reason, last_failure=reason)
        if self.ctx.coord.mark_failed(head.node, reason, rollback=True):
            self.ctx.log.error("canary.failed", svc=self.svc, item=head.node, reason=reason)
        self.ctx.wake()

    def _verify_peers(self, fresh: decisions.ServiceView,
                      hold: canary.Hold) -> tuple[decisions.Decision, tuple[str, ...]]:
        """verify_peers: probe the online hosts' published endpoints (peers.py); those that
        do not answer count neither as online nor as holding a ready-queue slot. In
        status.json (``verify_peers``): the last gate's probes, seconds, silent hosts,
        and this host's ready-queue position before and after."""
        ctx = self.ctx
        result = peers.verify(fresh, ctx.host)
        verified = peers.without(hold.view, result.silent)
        decision = decisions.may_take_down(verified, ctx.host, ctx.local.get(self.svc).active)
        self.set(verify_peers=VerifyPeersStatus(
            probes=result.probes, seconds=round(result.seconds, 4),
            silent=tuple(result.silent), passed=decision.ok,
            position=peers.position(hold.view, ctx.host),
            verified_position=peers.position(verified, ctx.host)))
        if result.silent:
            ctx.log.warning("gate.peers_silent", svc=self.svc, hosts=result.silent)
        return decision, result.silent

    # -- recovery ---------------------------------------------------------------------
    def recover(self, program: str, spec: ServiceSpec | None,
                view: decisions.ServiceView | None) -> None:
        """Start the right version of a service that is not running (docs/design.md §4.7)."""
        svc, ctx = self.svc, self.ctx
        if time.monotonic() < self.recover_after:
            return
        st = ctx.local.get(svc)
        rd = self.rd
        installed = rd.installed()
        local_active = st.active
        if not st.verified and st.previous in installed:
            local_active = st.previous  # the switch to `active` never passed its check
        target = None
        if view is not None and view.head is not None and view.head.service == svc:
            target = view.head.version
        if view is not None:
            view = ctx.coord.resolve(svc, view)  # the versions online decide
        current = list(view.current.values()) if view is not None else []
        version, why = decisions.recovery_version(current, installed, local_active, target)
        if version is None:
            if view is not None and view.staged is not None:
                self.set(phase="installing", reason="no release installed yet: "
                         f"fetching staged {view.staged.version}")
                self.prefetch(view)
            else:
                self.set(phase="down", reason=why)
            return
        ctx.log.info("recover.start", svc=svc, version=version, why=why)
        self.set(phase="recovering", reason=why)
        if rd.active() != version:
            try:
                rd.point_current(version)
            except OSError as exc:
                ctx.log.error("recover.repoint_failed", svc=svc, version=version,
                              error=str(exc))
                self.set(phase="down", reason=f"cannot point current at {version}: {exc}")
                self.recover_after = time.monotonic() + RECOVER_RETRY_SECS
                return
        self._record(active=version, verified=False,
                     previous=st.previous if version == st.previous else st.active)
        problem = self._start_and_check(program, spec, hold=False)
        if problem is not None:
            ctx.log.error("recover.failed", svc=svc, version=version, reason=problem)
            self.set(phase="down", reason=f"recovery with {version} failed: {problem}")
            self.recover_after = time.monotonic() + RECOVER_RETRY_SECS
            return
        self._record(verified=True)
        ctx.log.info("recover.done", svc=svc, version=version)
        if view is not None and ctx.connected():
            self._register(version)
        ctx.wake()

    # -- completion -------------------------------------------------------------------
    def maybe_complete(self, view: decisions.ServiceView) -> None:
        if canary.hold(view, "", time.time()).holding:
            return  # every host may be a canary: the soak still decides, not completion
        done = decisions.item_complete(view)
        if not done and self._may_resolve(view):
            view = self.ctx.coord.resolve(self.svc, view)
            done = decisions.item_complete(view)
        if not done:
            return
        head = view.head
        assert head is not None
        timings = [{"host": h, **e.switch} for h, e in sorted(view.current.items())
                   if e.switch is not None and e.switch.get("version") == head.version]
        if not self.ctx.coord.complete(self.svc, head, done.reason, timings):
            self.ctx.log.info("deploy.complete_contended", svc=self.svc, item=head.node)
            return
        self.ctx.log.info("deploy.done", svc=self.svc, item=head.node, version=head.version)
        self.ctx.wake()

    def _may_resolve(self, view: decisions.ServiceView) -> bool:
        """Whether to read the presences not read yet to see if the item is complete:
        when this host just switched (the last to switch sees the ready queue empty), or
        when the item has stayed open with an empty queue for COMPLETE_FALLBACK_SECS.

        Hosts that end their switches at the same moment (``max_parallel`` > 1) may each
        still see another in the queue, its leaving not yet in this host's view: such a
        host keeps the duty while only hosts mid-switch are left in the queue
        (:func:`decisions.only_switching_left`), and checks again when their leaving
        wakes it, instead of every host waiting for the fallback."""
        head = view.head
        just_switched, self.switched = self.switched, False
        if head is None or head.service != self.svc \
                or decisions.ready_queue(view, head.version) \
                or not any(e.version == "" for e in view.current.values()):
            if just_switched and head is not None and head.service == self.svc and \
                    decisions.only_switching_left(view, head.version, self.ctx.host):
                self.switched = True
            self.queue_empty_since = None
            return False
        now = time.monotonic()
        if self.queue_empty_since is None:
            self.queue_empty_since = now
        if just_switched or now - self.queue_empty_since >= COMPLETE_FALLBACK_SECS:
            self.queue_empty_since = now
            return True
        return False

    # -- local state ------------------------------------------------------------------
    def _record(self, **changes: Any) -> None:
        """Save local state; a failure (full disk) is reported, never fatal to a switch:
        the ``current`` symlink is what supervisord starts."""
        local = self.ctx.local
        try:
            with self.ctx.state_lock:  # switch threads of other services write it too
                local.update(self.svc, **changes)
        except OSError as exc:
            self.ctx.log.error("state.write_failed", svc=self.svc, error=str(exc))
            self.set(error=f"cannot write {local.path}: {exc.strerror or exc}")

    def _spec(self, view: decisions.ServiceView | None) -> ServiceSpec | None:
        if view is not None and view.spec is not None:
            return view.spec
        cached = self.ctx.local.get(self.svc).spec
        if cached:
            try:
                return ServiceSpec.parse(self.svc, cached)
            except InvalidData:
                return None
        return None


__all__ = ["CANARY_CHECK_SECS", "COMPLETE_FALLBACK_SECS", "HostContext", "ServiceReconciler"]
