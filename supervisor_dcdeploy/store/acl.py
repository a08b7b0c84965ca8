"""Who may do what in the store: the ZooKeeper ACL layout, in one place.

Two kinds of identity, both ZooKeeper ``digest`` users (``user:password`` kept in a
root-only file named by the store URL's ``auth=``):

- the **operator**: ALL on every node (it defines services, stages releases, queues and
  aborts deploys, and runs ``dcdeploy init``, which sets these ACLs);
- one identity per **host**: READ everywhere, plus exactly what the protocol needs of an
  agent (see :data:`HOST_PERMS`). Nodes a host creates for itself (presence, ready-queue
  entry, registry entry, swarm membership) get an ACL naming that host alone as writer.

Nobody else (``world``) has any permission: reads need an identity too, because the store
holds the fleet's inventory (hosts, racks, versions, release URLs).

ZooKeeper checks CREATE and DELETE on the *parent*, and cannot restrict them by child
name: a host allowed to create its presence under ``current/<svc>`` can also create or
delete a sibling there. It cannot *change* a sibling's value (WRITE is on the node
itself). docs/security.md ("ZooKeeper access control") says what that leaves a
compromised host.

The policy (who is operator, who is a host) is the root node's data, written by ``dcdeploy
init``: a host needs the operator's and the other hosts' digest ids to create nodes they
can read and the operator can clean up, and ZooKeeper 3.8 shows digest ids in an ACL only
to holders of ADMIN on that node (``getACL`` answers ``user:x`` to others). The ids are
salt-free SHA-1 hashes of ``user:password``: every host can read them, so every password
must be random and long (:func:`read_identity` refuses one under 16 characters). A host
reads the policy before each create, so hosts added by a later ``init`` can read what is
created afterwards without restarting anybody.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kazoo.security import ACL, Id, Permissions, make_digest_acl_credential

READ, WRITE, CREATE, DELETE, ADMIN, ALL = (Permissions.READ, Permissions.WRITE,
                                           Permissions.CREATE, Permissions.DELETE,
                                           Permissions.ADMIN, Permissions.ALL)

# What every host identity may do on a node of each kind, beyond the operator's ALL.
# Kinds are the path with names replaced: "current/*" is current/<svc>.
HOST_PERMS: dict[str, int] = {
    "": READ,                           # the root; its data is the policy (digest ids)
    "services": READ, "services/*": READ,
    "staging": READ,
    "staging/*": READ | CREATE | DELETE,  # ready-queue entries <host>-<seq> below
    "current": READ,
    "current/*": READ | CREATE | DELETE,  # presence: create own, delete own on take-down
    "gate": READ,
    "gate/*": READ | WRITE,             # bumped by every voluntary take-down
    "released": READ,
    "released/*": READ | WRITE,         # written when a host completes the deploy item
    "deploy": READ | DELETE,            # a host completing an item deletes it ...
    "deploy/*": READ | WRITE,           # ... and updates its state / reason / host fields
    "history": READ | CREATE,           # ... and moves it here
    "history/*": READ,
    "hosts": READ,                      # registry entries are made by init, per host
    "peers": READ | CREATE | DELETE,    # swarm membership: peers/<infohash>/<host>
    "peers/*": READ | CREATE | DELETE,
}

# Kinds whose node belongs to one host (named in the path): that host gets ALL on it,
# every other host READ.
# ``hosts/*/*`` is ``hosts/<host>/session``, which only the host (who has ALL on its
# ``hosts/<host>``, made by init) can create: its ephemeralOwner is the host's session.
OWNED = ("staging/*/*", "current/*/*", "hosts/*", "hosts/*/*", "peers/*/*")

POLICY_NODE = ""  # the policy is the root's data
MIN_PASSWORD = 16


class CredentialError(ValueError):
    """A credential or key file is missing, malformed, or readable by others."""


@dataclass(frozen=True)
class Identity:
    """A ZooKeeper digest user. ``digest_id`` is what ACLs name (``user:base64(sha1)``);
    the password itself is only sent to the server, at session start."""

    user: str
    password: str

    @property
    def digest_id(self) -> str:
        return make_digest_acl_credential(self.user, self.password)

    @property
    def auth_data(self) -> tuple[str, str]:
        return ("digest", f"{self.user}:{self.password}")


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that is not a regular file owned by us (or root), or that
    group or others may read or write."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CredentialError(f"{what} {path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"{what} {path}: not a regular file")
    if st.st_mode & 0o077:
        raise CredentialError(
            f"{what} {path} is readable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): make it private (chmod 600 {path})")
    if st.st_uid not in (0, os.geteuid()):
        raise CredentialError(f"{what} {path}: owned by uid {st.st_uid}, neither root nor "
                              "this process's user: chown it")


def read_identity(path: str | Path, what: str = "credential file") -> Identity:
    """Read ``user:password`` (one line) from a private file. Raises :class:`CredentialError`."""
    path = Path(path)
    check_private_file(path, what)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"{what} {path}: cannot read: {exc}") from None
    user, sep, password = text.partition(":")
    if not sep or not user or not password or "\n" in text or any(c.isspace() for c in user):
        raise CredentialError(f"{what} {path}: expected one line 'user:password'")
    if len(password) < MIN_PASSWORD:
        raise CredentialError(
            f"{what} {path}: the password has {len(password)} characters; use a random one "
            f"of at least {MIN_PASSWORD} (e.g. openssl rand -base64 24): hosts can read its "
            "hash")
    return Identity(user, password)


@dataclass(frozen=True)
class AclPolicy:
    """Digest ids (``user:hash``) of the operator(s) and of every host."""

    operators: tuple[str, ...]
    hosts: tuple[str, ...]

    def to_json(self) -> bytes:
        return json.dumps({"operators": list(self.operators), "hosts": list(self.hosts)},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> "AclPolicy | None":
        """The policy ``init`` wrote; None when absent or unreadable."""
        try:
            data = json.loads(raw or b"")
            ops, hosts = data["operators"], data["hosts"]
        except (ValueError, TypeError, KeyError):
            return None
        ok = all(isinstance(x, str) and x.count(":") == 1 for x in [*ops, *hosts])
        return cls(tuple(ops), tuple(hosts)) if ok and isinstance(ops, list) and ops and \
            isinstance(hosts, list) else None


def kind_of(path: str) -> str:
    """``current/api/web-01`` -> ``current/*/*`` (the root is ``""``)."""
    parts = [p for p in path.split("/") if p]
    return "/".join(parts[:1] + ["*"] * (len(parts) - 1))


def owner_of(path: str) -> str | None:
    """The host a node of an owned kind belongs to (from its name), else None."""
    kind = kind_of(path)
    if kind not in OWNED:
        return None
    name = path.rstrip("/").rpartition("/")[2]
    if kind == "hosts/*/*":  # hosts/<host>/session
        name = path.split("/")[1]
    if kind == "staging/*/*":  # <host>-<10-digit seq>
        name = name.rpartition("-")[0]
    return name or None


def acl_for(path: str, policy: AclPolicy, owner: str | None = None) -> list[ACL]:
    """The ACL a node at ``path`` (relative to the root) must carry.

    ``owner`` is the digest id of the host a node of an owned kind belongs to; without
    one, such a node is writable by the operator only. Unknown kinds get the safe
    default: operator ALL, hosts READ. Pure; never raises."""
    kind = kind_of(path)
    out = [ACL(ALL, Id("digest", op)) for op in policy.operators]
    taken = set(policy.operators)
    if kind in OWNED and owner and owner not in taken:
        out.append(ACL(ALL, Id("digest", owner)))
        taken.add(owner)
    perms = READ if kind in OWNED else HOST_PERMS.get(kind, READ)
    out += [ACL(perms, Id("digest", h)) for h in policy.hosts if h not in taken]
    return out


def same_acl(a: list[ACL], b: list[ACL]) -> bool:
    return sorted((x.perms, x.id.scheme, x.id.id) for x in a) == \
        sorted((x.perms, x.id.scheme, x.id.id) for x in b)
