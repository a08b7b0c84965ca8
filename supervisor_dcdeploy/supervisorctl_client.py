"""The agent's view of its supervisord: program state, stop, start (XML-RPC, unix socket)."""

from __future__ import annotations

import os
import xmlrpc.client

from supervisor.xmlrpc import Faults, SupervisorTransport


class SupervisorError(Exception):
    pass


class SupervisorShuttingDown(SupervisorError):
    """supervisord answered SHUTDOWN_STATE: it is stopping (a normal shutdown, not a fault)."""


def _shutting_down(exc: xmlrpc.client.Fault) -> SupervisorShuttingDown | None:
    if exc.faultCode == Faults.SHUTDOWN_STATE:
        return SupervisorShuttingDown("supervisord is shutting down")
    return None


class Supervisor:
    """Not thread-safe: one per thread (the agent's worker owns it)."""

    def __init__(self, url: str | None = None) -> None:
        url = url or os.environ.get("SUPERVISOR_SERVER_URL")
        if not url:
            raise SupervisorError("no supervisord URL: run the agent under supervisord, or set "
                                  "supervisor_url in agent.conf")
        self.url = url
        transport = SupervisorTransport(os.environ.get("SUPERVISOR_USERNAME"),
                                        os.environ.get("SUPERVISOR_PASSWORD"), url)
        self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    @property
    def rpc(self):
        return self._proxy

    def state(self, program: str) -> str:
        """supervisord's state name for ``program`` (RUNNING, STOPPED, FATAL...)."""
        try:
            return self._proxy.supervisor.getProcessInfo(program)["statename"]
        except xmlrpc.client.Fault as exc:
            if _shutting_down(exc):
                raise _shutting_down(exc) from None
            if exc.faultCode == Faults.BAD_NAME:
                raise SupervisorError(f"supervisord has no program {program!r}: add a "
                                      f"[program:{program}] section (see conf/)") from None
            raise SupervisorError(f"getProcessInfo({program}): {exc.faultString}") from None
        except OSError as exc:
            raise SupervisorError(f"supervisord at {self.url}: {exc}") from None

    def states(self) -> dict[str, str]:
        """Every program's state name, in one call (``getAllProcessInfo``), by the names
        :meth:`state` takes: ``group:name``, and ``name`` alone when it is its group's."""
        try:
            infos = self._proxy.supervisor.getAllProcessInfo()
        except xmlrpc.client.Fault as exc:
            if _shutting_down(exc):
                raise _shutting_down(exc) from None
            raise SupervisorError(f"getAllProcessInfo: {exc.faultString}") from None
        except OSError as exc:
            raise SupervisorError(f"supervisord at {self.url}: {exc}") from None
        out: dict[str, str] = {}
        for info in infos:
            name, group, state = info.get("name"), info.get("group"), info.get("statename")
            if isinstance(name, str) and isinstance(group, str) and isinstance(state, str):
                out[f"{group}:{name}"] = state
                if group == name:
                    out[name] = state
        return out

    def _call(self, what: str, method, *args, ok_fault: int) -> None:
        try:
            method(*args)
        except xmlrpc.client.Fault as exc:
            if _shutting_down(exc):
                raise _shutting_down(exc) from None
            if exc.faultCode != ok_fault:
                raise SupervisorError(f"{what}: {exc.faultString}") from None
        except OSError as exc:
            raise SupervisorError(f"supervisord at {self.url}: {exc}") from None

    def stop(self, program: str) -> None:
        """Stop and wait until stopped; a program already stopped is fine."""
        self._call(f"stop {program}", self._proxy.supervisor.stopProcess, program, True,
                   ok_fault=Faults.NOT_RUNNING)

    def start(self, program: str) -> None:
        """Start and wait for RUNNING (supervisord's startsecs); raise with its reason."""
        self._call(f"start {program}", self._proxy.supervisor.startProcess, program, True,
                   ok_fault=Faults.ALREADY_STARTED)
