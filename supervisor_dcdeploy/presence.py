"""Whose presence counts (docs/security.md, "Presences are checked against sessions").

ZooKeeper checks CREATE and DELETE on the parent, so any host allowed to create its own
presence under ``current/<svc>`` can create one under another host's name. What it cannot
forge is the *owner* ZooKeeper records on an ephemeral node (``ephemeralOwner``, the
creating session's id), nor ``hosts/<host>/session``, which only that host can create
(its ACL) and whose own owner is therefore that host's live session. A presence counts
only when both owners are the same session. Pure: the reads are the caller's.
"""

from __future__ import annotations

from typing import Mapping


def counted(kind: str, owners: Mapping[str, int | None],
            sessions: Mapping[str, int | None]) -> tuple[set[str], list[str]]:
    """Which of the named nodes count, and a problem in words for each that does not.

    ``kind`` names the nodes in the problem text (``"presence of api"``); ``owners`` maps
    the host a node names to its ``ephemeralOwner`` (0: persistent; None: the backend
    cannot tell, then the node counts unchecked); ``sessions`` maps a host to the owner of
    its ``hosts/<host>/session`` node (None when it has none)."""
    valid: set[str] = set()
    problems: list[str] = []
    for host in sorted(owners):
        owner = owners[host]
        if owner is None:
            valid.add(host)
            continue
        session = sessions.get(host)
        if owner == 0:
            problems.append(f"{kind} {host} is not ephemeral (not made by an agent's "
                            "session): not counted")
        elif not session:
            problems.append(f"{kind} {host} is not counted: {host} has no live session "
                            f"(hosts/{host}/session is missing)")
        elif owner != session:
            problems.append(f"{kind} {host} is owned by another session "
                            f"({owner:#x}, {host}'s is {session:#x}): not counted")
        else:
            valid.add(host)
    return valid, problems
