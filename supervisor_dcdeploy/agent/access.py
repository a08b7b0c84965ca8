"""When the agent checks that the store still admits it (docs/security.md, "A refused
identity").

ZooKeeper sends no event when an ACL changes, so an agent that follows a mirror and reads
nothing when idle would never notice that ``dcdeploy init`` revoked it. The agent
therefore makes one read the store checks against its rights every ``store_check_secs``.
That read is needed only while nothing newer shows that the store still admits this
identity. Two things show it:

* a request that the store checked against our rights and accepted (ZooKeeper: a read of
  a node's data or children, a create, set, delete or committed multi; not ``exists`` or
  ``sync``, which ZooKeeper 3.8 answers without looking at the ACL, and not an error);
* a watch notification, on a server that sends one only to sessions that may read the
  node that changed: ZooKeeper 3.9.2 and 3.8.4 on (the fix of CVE-2024-23944, also in
  Debian's 3.8.0-11+deb12u2), checked by
  ``tests/test_zk_security.py::test_a_revoked_host_hears_no_notifications``. An older
  server notifies a revoked session too, so there a notification proves only that the
  session is alive: ``store_events_prove_access = false`` in agent.conf.

Every node of the tree gives all admitted hosts the same read right (docs/security.md), so
one node read or notified proves as much as the check's read of ``hosts/<host>`` does.

The decision is a pure function of those times, with its reason in words; the worker
(:meth:`..agent.worker.Agent._check_access`) supplies them and makes the read.
"""

from __future__ import annotations

from collections.abc import Mapping


def access_check_due(now: float, interval: float, *, checked_at: float | None,
                     accepted_at: float | None, notified_at: float | None,
                     events_prove: bool, refused: bool) -> tuple[bool, str]:
    """Whether to read once now to learn whether the store still admits this host, and why.

    All times are of one monotonic clock; ``None``: never. ``checked_at``: the last access
    check that passed; ``accepted_at``: the last request the store checked against our
    rights and accepted; ``notified_at``: the last watch notification (counts only with
    ``events_prove``); ``refused``: an earlier cycle was refused (then every cycle checks,
    so a readmitted host notices at once and rebuilds what it follows).

    The check is due once ``interval`` has passed since the newest proof: a revocation is
    noticed at most ``interval`` after the last moment the store showed it admitted us."""
    if refused:
        return True, "the store refused this host before: checking each cycle until it " \
                     "admits it again"
    proofs = [(checked_at, "the last access check"),
              (accepted_at, "a request the store checked against our rights")]
    if events_prove:
        proofs.append((notified_at, "a notification, which the server sends only to "
                                    "sessions that may read the node"))
    known = [(when, what) for when, what in proofs if when is not None]
    if not known:
        return True, "nothing has shown yet that the store admits this host"
    when, what = max(known)
    age = now - when
    if age >= interval:
        return True, f"no proof of access for {age:.0f}s (the last: {what}); " \
                     f"the check runs every {interval:g}s without one"
    return False, f"{what}, {age:.0f}s ago, shows the store still admits this host"


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def events_prove_access(extra: Mapping[str, str]) -> bool:
    """agent.conf ``store_events_prove_access`` (default true): whether the store's server
    sends a watch notification only to sessions that may read the node (see above). Raises
    ValueError naming the key and the value when it is neither true nor false."""
    raw = extra.get("store_events_prove_access", "").strip().lower()
    if not raw or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"store_events_prove_access: {raw!r} is not true or false (false for a "
                     "ZooKeeper server older than 3.8.4 / 3.9.2 without the fix of "
                     "CVE-2024-23944)")
