"""``[rpcinterface:dcdeploy]``: this host's deploy state over supervisord's XML-RPC.

Runs inside supervisord's single poll loop (docs/design.md §7): no blocking call, no thread, no
store access. It only reads the small status and state files the agent writes atomically,
and the factory is idempotent (supervisord calls it again on every reload)."""

from __future__ import annotations

import configparser
import json
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import RPCError

from .localstate import STATUS_FILE, read_state

API_VERSION = "1.0"


class DcdeployNamespaceRPCInterface:
    def __init__(self, supervisord: Any, root: Path | None, problem: str | None = None) -> None:
        self.supervisord = supervisord
        self.root = root
        self.problem = problem

    def getAPIVersion(self) -> str:  # noqa: N802 (XML-RPC naming)
        """The version of this interface."""
        return API_VERSION

    def _read(self, name: str) -> dict:
        if self.root is None:
            raise RPCError(500, self.problem or "agent root unknown")
        try:
            return json.loads((self.root / name).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RPCError(500, f"{self.root / name}: {exc}") from None

    def _local(self) -> dict:
        if self.root is None:
            raise RPCError(500, self.problem or "agent root unknown")
        try:
            return read_state(self.root)
        except (OSError, ValueError) as exc:
            raise RPCError(500, f"local state in {self.root}: {exc}") from None

    def getState(self) -> dict:  # noqa: N802
        """The agent's status (per service: version, phase, reason, fetch progress) and the
        host's local state (installed releases, active and previous versions)."""
        return _scrub({"status": self._read(STATUS_FILE), "local": self._local(),
                       "root": str(self.root)})


def _scrub(value: Any) -> Any:
    """XML-RPC has no null: leave out keys whose value is None (and None list items)."""
    if isinstance(value, dict):
        return {str(k): _scrub(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_scrub(v) for v in value if v is not None]
    return value


def _root_from(agent_config: str | None) -> tuple[Path | None, str | None]:
    if not agent_config:
        return None, "set agent_config in [rpcinterface:dcdeploy]"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(agent_config)
        return Path(parser["agent"]["root"]), None
    except (KeyError, configparser.Error) as exc:
        return None, f"{agent_config}: no [agent] root ({exc})"


def make_rpcinterface(supervisord: Any, **config: str) -> DcdeployNamespaceRPCInterface:
    root, problem = _root_from(config.get("agent_config"))
    return DcdeployNamespaceRPCInterface(supervisord, root, problem)
