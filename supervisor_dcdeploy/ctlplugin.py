"""``supervisorctl dcdeploy status``: this host's deploy state, from the rpcinterface."""

from __future__ import annotations

import json
import xmlrpc.client
from typing import Any

from supervisor.supervisorctl import ControllerPluginBase, LSBInitExitStatuses


def render(state: dict[str, Any]) -> str:
    status = state.get("status") or {}
    lines = [f"host {status.get('host', '?')} rack {status.get('rack') or '-'} "
             f"store {status.get('store', '?')}"]
    for svc, info in sorted((status.get("services") or {}).items()):
        fetch = info.get("fetch") or {}
        fetch_text = ""
        if fetch:
            fetch_text = f" fetch {fetch.get('version')}: {fetch.get('state')}"
            if fetch.get("total"):
                fetch_text += f" {100 * fetch.get('done', 0) // max(1, fetch['total'])}%"
            if fetch.get("error"):
                fetch_text += f" ({fetch['error']})"
        lines.append(f"{svc:<16} {info.get('version') or '-':<12} {info.get('process', '?'):<9} "
                     f"{info.get('phase', '?'):<11} {info.get('reason') or ''}{fetch_text}")
        if info.get("health_problem"):  # a check this host cannot run (health.resolve)
            lines.append(f"{'':<16} cannot run the health check: {info['health_problem']}")
    # Invalid store nodes the agent found (and does not act on); a queue problem shows up
    # under every service, so each is listed once.
    problems = list(dict.fromkeys(p for _, info in sorted((status.get("services") or {})
                                                          .items())
                                  for p in info.get("invalid") or ()))
    if problems:
        lines.append("PROBLEMS in the store (invalid data, not acted on):")
        lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


class DcdeployControllerPlugin(ControllerPluginBase):
    name = "dcdeploy"

    def do_dcdeploy(self, arg: str) -> None:
        """dcdeploy status [--json]\tShow this host's deploy state."""
        words = arg.split()
        if not words or words[0] != "status":
            self.ctl.output("usage: dcdeploy status [--json]")
            self.ctl.exitstatus = LSBInitExitStatuses.GENERIC
            return
        try:
            state = self.ctl.get_server_proxy("dcdeploy").getState()
        except xmlrpc.client.Fault as exc:
            self.ctl.output(f"dcdeploy: {exc.faultString}")
            self.ctl.exitstatus = LSBInitExitStatuses.GENERIC
            return
        self.ctl.output(json.dumps(state, sort_keys=True) if "--json" in words
                        else render(state))

    def help_dcdeploy(self) -> None:
        self.ctl.output("dcdeploy status [--json]\tShow this host's deploy state")


def make_ctlplugin(controller: Any, **config: str) -> DcdeployControllerPlugin:
    return DcdeployControllerPlugin(controller)
