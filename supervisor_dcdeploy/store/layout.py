"""The store layout, in one place: every path below the root (docs/store-layout.md).

The layout is a public interface: operators stage and deploy with the store's own CLI
(``zkCli.sh``, ``consul kv``), so these names change only with that document. Paths are
relative to the store's root (``/dc``); Consul keys are the same under the root prefix.
"""

from __future__ import annotations

SERVICES = "services"
STAGING = "staging"
CURRENT = "current"
DEPLOY = "deploy"
GATE = "gate"
RELEASED = "released"
HISTORY = "history"
HOSTS = "hosts"
PEERS = "peers"

# The per-service bases an agent makes (when allowed) and watches.
PER_SERVICE = (CURRENT, STAGING, GATE, RELEASED)
TOP_LEVEL = (DEPLOY, HISTORY, HOSTS, PEERS)


def service(svc: str) -> str:
    """``services/<svc>``: the operator's spec."""
    return f"{SERVICES}/{svc}"


def staged(svc: str) -> str:
    """``staging/<svc>``: the staged release; its children are the ready queue."""
    return f"{STAGING}/{svc}"


def ready_entry(svc: str, node: str) -> str:
    """``staging/<svc>/<host>-<seq>``: one host ready to roll."""
    return f"{STAGING}/{svc}/{node}"


def ready_prefix(svc: str, host: str) -> str:
    """What a host creates (sequential) to join the ready queue."""
    return f"{STAGING}/{svc}/{host}-"


def presence_dir(svc: str) -> str:
    return f"{CURRENT}/{svc}"


def presence(svc: str, host: str) -> str:
    """``current/<svc>/<host>``: the host serves the service (ephemeral)."""
    return f"{CURRENT}/{svc}/{host}"


def gate(svc: str) -> str:
    return f"{GATE}/{svc}"


def released(svc: str) -> str:
    return f"{RELEASED}/{svc}"


def item(node: str) -> str:
    """``deploy/item-<seq>``: one queued deploy."""
    return f"{DEPLOY}/{node}"


ITEM_PREFIX = f"{DEPLOY}/item-"


def history(node: str) -> str:
    return f"{HISTORY}/{node}"


def host(name: str) -> str:
    """``hosts/<host>``: the registry entry."""
    return f"{HOSTS}/{name}"


def session(name: str) -> str:
    """``hosts/<host>/session``: ephemeral, made by the host in each of its sessions. Its
    ``ephemeralOwner`` is the host's live session id; a presence or ready-queue entry
    naming the host counts only when held by that same session (docs/security.md)."""
    return f"{HOSTS}/{name}/session"


def peers(infohash: str) -> str:
    return f"{PEERS}/{infohash}"


def peer(infohash: str, name: str) -> str:
    return f"{PEERS}/{infohash}/{name}"


def split(path: str) -> tuple[str, ...]:
    """``"current/api/web-01"`` -> ``("current", "api", "web-01")``."""
    return tuple(p for p in path.split("/") if p)
