"""Hosts trust a key, not the store: Ed25519 signatures over what operators write.

The store holds three kinds of operator data that decide what runs on every host: service
specs (``services/<svc>``), staged releases (``staging/<svc>``) and deploy items
(``deploy/item-<seq>``). Each carries a ``"signature"`` object next to its fields::

    "signature": {"keyid": "<16 hex>", "sig": "<base64>", "counter": 1764668400000,
                  "expires": "2026-12-09T09:30:00Z"}

The signature covers a canonical payload built from the *parsed* value (so the signer and
every verifier see the same numbers): the kind, the service, every operator field, the
counter and the expiry. The fields agents update on a deploy item (state, reason, host,
updated) are left out, so hosts can move an item along without the key.

Key files are PEM: the private key PKCS#8 (mode 0600), the public key SubjectPublicKeyInfo,
the same files ``openssl genpkey -algorithm ed25519`` / ``openssl pkey -pubout`` write. A
key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.

:func:`verify` is pure: (payload, signature, trusted keys, now, last counter seen) -> a
:class:`Verdict` with the reason in words. :class:`CounterLog` keeps the highest counter a
host has accepted per kind and service (``<root>/trust.json``), against replays.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from .files import atomic_write
from .model import DeployItem, ServiceSpec, StagedRelease
from .store import layout

SIGN_KEY_ENV = "DCDEPLOY_SIGN_KEY"
DOMAIN = b"dcdeploy-signed-v1\n"  # never valid as another protocol's message
MAX_COUNTER = 2 ** 53 - 1  # exact in every JSON reader
TRUST_FILE = "trust.json"
EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
KEYID_RE = re.compile(r"[0-9a-f]{16}")

DAY = 86400.0
# Default lifetimes (docs/security.md, "Expiry"): a deploy item is meant to run now; a
# staged release for the next weeks; a service spec changes rarely.
DEFAULT_EXPIRES = {"deploy": 7 * DAY, "release": 30 * DAY, "service": 90 * DAY}
MAX_EXPIRES = 366 * DAY

KINDS = ("service", "release", "deploy")


class TrustError(ValueError):
    """A key file or a signing request is unusable; the message names it."""


# -- keys ------------------------------------------------------------------------------
def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """An operator's private key, ready to sign."""

    key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def keyid(self) -> str:
        return key_id(self.public)


def generate(out_dir: Path, name: str = "operator") -> tuple[Path, Path, str]:
    """Write ``<name>.key`` (0600, created exclusively: never overwrites) and ``<name>.pub``
    in ``out_dir``; return (private path, public path, key id)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = out_dir / f"{name}.key"
    public = out_dir / f"{name}.pub"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TrustError(f"{private} exists already: not overwriting a key") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public, key_id(key.public_key())


def load_signer(path: Path | str) -> Signer:
    """Read a PEM Ed25519 private key; raises :class:`TrustError` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError(f"signing key {path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"signing key {path}: not an unencrypted PEM private key "
                         f"({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"signing key {path}: a {type(key).__name__}, not Ed25519")
    return Signer(key, path)


def default_signer() -> Signer | None:
    """The key named by ``$DCDEPLOY_SIGN_KEY``, or None when it is not set."""
    path = os.environ.get(SIGN_KEY_ENV, "").strip()
    return load_signer(path) if path else None


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError(f"trusted key {path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"trusted key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(f"trusted key {path}: a {type(key).__name__}, not Ed25519")
    return key


def load_trusted(pattern: str) -> dict[str, Ed25519PublicKey]:
    """The public keys matched by a glob (``/etc/dcdeploy/keys/*.pub``), by key id.

    Refuses (TrustError) a pattern that matches nothing, an unreadable or non-Ed25519 file,
    and a file others could change (group- or world-writable, or owned by another user
    than root or this process): whoever can write a trusted key chooses what runs."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise TrustError(f"trusted_keys {pattern!r} matches no file")
    keys: dict[str, Ed25519PublicKey] = {}
    for name in paths:
        path = Path(name)
        st = path.stat()
        if st.st_mode & 0o022:
            raise TrustError(f"trusted key {path}: writable by group or others "
                             f"(mode {st.st_mode & 0o777:o}): chmod go-w {path}")
        if st.st_uid not in (0, os.geteuid()):
            raise TrustError(f"trusted key {path}: owned by uid {st.st_uid}, not root")
        key = load_public(path)
        keys[key_id(key)] = key
    return keys


# -- payloads ------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """Dataclass values as JSON-ready data (tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def spec_payload(spec: ServiceSpec) -> dict[str, Any]:
    """Every field of the spec (new fields are signed without a change here)."""
    data = _plain(spec)
    data.pop("signature", None)
    name = data.pop("name")
    # The rollout policy as the spec's JSON has it: its keys only when not the default,
    # so a spec signed before the policy existed keeps the payload it was signed with.
    data.pop("policy", None)
    data.update(spec.policy.to_dict())
    return {"kind": "service", "service": name, **data}


def release_payload(release: StagedRelease) -> dict[str, Any]:
    """Service, version, sha256, size, URLs and the torrent (by its sha256: the infohash,
    trackers and web seeds are all inside it), plus any field added to the model."""
    data = _plain(release)
    data.pop("signature", None)
    torrent = data.pop("torrent", None)
    data["torrent_sha256"] = hashlib.sha256(torrent.encode()).hexdigest() if torrent else None
    return {"kind": "release", **data}


def item_payload(item: DeployItem) -> dict[str, Any]:
    """What an operator decides about a deploy item: which service goes to which version.
    The agent-updated fields (state, reason, host, updated, and the canary bookkeeping)
    are not signed. The canary count, soak and an approval are the operator's and are
    signed when set (absent when not, so items without them verify as before)."""
    payload: dict[str, Any] = {"kind": "deploy", "service": item.service,
                               "version": item.version}
    # What the item waits for and the deploy's per-host limit decide what may roll at once:
    # signed when set (an item without them runs in series, as items always did).
    if item.after is not None:
        payload["after"] = list(item.after)
    if item.host_parallel is not None:
        payload["host_parallel"] = item.host_parallel
    # The deploy's rack overrides decide how many hosts of a rack go at once and in what
    # order: signed when set (absent otherwise, so older items verify as before).
    if item.max_down_per_rack is not None:
        payload["max_down_per_rack"] = item.max_down_per_rack
    if item.rack_order:
        payload["rack_order"] = list(item.rack_names) if item.rack_names else True
    if item.canary:
        payload.update(canary=item.canary, soak_secs=item.soak_secs)
    if item.approved:
        payload["approved"] = True
    return payload


def payload_of(value: ServiceSpec | StagedRelease | DeployItem) -> dict[str, Any]:
    if isinstance(value, ServiceSpec):
        return spec_payload(value)
    if isinstance(value, StagedRelease):
        return release_payload(value)
    return item_payload(value)


def message(payload: Mapping[str, Any], counter: int, expires: str) -> bytes:
    """The exact bytes signed: a domain prefix and canonical JSON (sorted keys, no spaces,
    ASCII, no NaN)."""
    body = {**payload, "counter": counter, "expires": expires}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                               allow_nan=False).encode()


def format_expires(when: float) -> str:
    return time.strftime(EXPIRES_FORMAT, time.gmtime(when))


@functools.lru_cache(maxsize=256)  # the same few signatures' times, checked every cycle
def parse_expires(text: str) -> float:
    """Seconds since the epoch; ValueError unless exactly ``YYYY-MM-DDTHH:MM:SSZ``."""
    return float(calendar.timegm(time.strptime(text, EXPIRES_FORMAT)))


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY, "w": 7 * DAY}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds; TrustError when malformed,
    not positive or longer than a year."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise TrustError(f"--expires {text!r}: expected a duration like 30d, 12h, 90m or 3600s")
    secs = float(m.group(1)) * _UNITS[m.group(2)]
    if not 0 < secs <= MAX_EXPIRES:
        raise TrustError(f"--expires {text!r}: must be more than 0 and at most 366d")
    return secs


def next_counter(now: float, previous: int | None) -> int:
    """A per-service counter that only grows: the time in ms, or one more than the last
    counter this operator signed when that is higher (two signatures in one ms, or a
    clock that went back). See docs/security.md, "Counters"."""
    counter = max(int(now * 1000), (previous or 0) + 1)
    if counter > MAX_COUNTER:
        raise TrustError(f"counter {counter} is beyond {MAX_COUNTER}")
    return counter


def sign(signer: Signer, payload: Mapping[str, Any], counter: int,
         expires: float) -> dict[str, Any]:
    """The ``"signature"`` object for a payload."""
    when = format_expires(expires)
    sig = signer.key.sign(message(payload, counter, when))
    return {"keyid": signer.keyid, "sig": base64.b64encode(sig).decode(),
            "counter": counter, "expires": when}


# -- verification ----------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    counter: int | None = None

    def __bool__(self) -> bool:
        return self.ok


def signature_counter(signature: Any) -> int | None:
    """The counter of a signature object, or None when there is no well-formed one."""
    if isinstance(signature, Mapping):
        counter = signature.get("counter")
        if isinstance(counter, int) and not isinstance(counter, bool) and \
                0 <= counter <= MAX_COUNTER:
            return counter
    return None


# Signatures found valid, remembered: the agent checks every service's spec, staged
# release and each queued item at every cycle, the same signed bytes over and over while
# a deploy runs (80 checks a cycle for 8 services and 8 items), and the Ed25519 check was
# nearly all of its CPU (bench/waves.py, docs/policy.md). A hit needs the same public key,
# signature and signed bytes, so it answers what the check would; a failure is not kept.
VERIFIED_MEMO = 1024


@functools.lru_cache(maxsize=VERIFIED_MEMO)
def _signature_valid(public: bytes, sig: bytes, signed: bytes) -> bool:
    """True when ``sig`` is ``public``'s Ed25519 signature of ``signed``; raises
    InvalidSignature otherwise (not cached)."""
    Ed25519PublicKey.from_public_bytes(public).verify(sig, signed)
    return True


def verify(payload: Mapping[str, Any], signature: Any,
           keys: Mapping[str, Ed25519PublicKey], now: float,
           last_counter: int | None) -> Verdict:
    """Is ``payload`` signed by one of ``keys``, unexpired at ``now`` and not older than
    the last counter accepted here? Pure; never raises on what the store holds."""
    if signature is None:
        return Verdict(False, "unsigned (no signature)")
    if not isinstance(signature, Mapping):
        return Verdict(False, f"malformed signature: expected an object, got "
                              f"{type(signature).__name__}")
    keyid, sig, expires = (signature.get(k) for k in ("keyid", "sig", "expires"))
    counter = signature_counter(signature)
    if not isinstance(keyid, str) or not KEYID_RE.fullmatch(keyid):
        return Verdict(False, f"malformed signature: keyid {keyid!r} is not 16 hex digits")
    if counter is None:
        return Verdict(False, f"malformed signature: counter {signature.get('counter')!r} "
                              f"is not an integer from 0 to {MAX_COUNTER}")
    if not isinstance(expires, str):
        return Verdict(False, f"malformed signature: expires {expires!r} is not a time")
    try:
        expires_at = parse_expires(expires)
    except (ValueError, OverflowError):
        return Verdict(False, f"malformed signature: expires {expires!r} is not "
                              "YYYY-MM-DDTHH:MM:SSZ")
    try:
        raw = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        return Verdict(False, "malformed signature: sig is not 64 bytes of base64")
    key = keys.get(keyid)
    if key is None:
        trusted = ", ".join(sorted(keys)) or "none"
        return Verdict(False, f"signed by unknown key {keyid} (trusted here: {trusted})")
    try:
        _signature_valid(key.public_bytes_raw(), raw, message(payload, counter, expires))
    except InvalidSignature:
        return Verdict(False, f"bad signature by key {keyid}: the signed fields were "
                              "changed after signing")
    except (TypeError, ValueError) as exc:  # a payload that cannot be canonical JSON
        return Verdict(False, f"cannot check the signature: {exc}")
    if now >= expires_at:
        return Verdict(False, f"signature expired at {expires} (re-sign it)")
    if last_counter is not None and counter < last_counter:
        return Verdict(False, f"counter {counter} is lower than {last_counter} already "
                              "accepted here: a replay of older data")
    return Verdict(True, f"signed by {keyid}, counter {counter}, expires {expires}", counter)


# -- what a host has seen --------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    counter: int
    node: str | None = None  # deploy items: the item the counter was first accepted on


class CounterLog:
    """``<root>/trust.json``: the highest counter accepted per ``<kind>/<service>``.

    Written atomically on every change (a small separate file beside state.json). A
    failed write keeps the value in memory and is reported by the caller; an unreadable
    file starts empty and is kept aside as ``trust.corrupt`` (``problem`` says so)."""

    def __init__(self, root: Path) -> None:
        self.path = root / TRUST_FILE
        self.seen: dict[str, Seen] = {}
        self.problem: str | None = None
        try:
            raw = json.loads(self.path.read_text())
            for key, value in raw.get("seen", {}).items():
                counter = value.get("counter")
                if not isinstance(counter, int) or isinstance(counter, bool):
                    raise TypeError(f"{key}: counter {counter!r}")
                node = value.get("node")
                self.seen[key] = Seen(counter, node if isinstance(node, str) else None)
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError, TypeError) as exc:
            self.problem = f"{self.path}: unreadable ({exc}); replay protection restarts"
            os.replace(self.path, self.path.with_suffix(".corrupt"))

    def get(self, key: str) -> Seen | None:
        return self.seen.get(key)

    def record(self, changes: Mapping[str, Seen]) -> None:
        """Merge and save; raises OSError when the file cannot be written (the in-memory
        values are kept)."""
        changed = {k: v for k, v in changes.items() if self.seen.get(k) != v}
        if not changed:
            return
        self.seen.update(changed)
        data = {"seen": {k: {"counter": v.counter, "node": v.node}
                         for k, v in sorted(self.seen.items())}}
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


@dataclass(frozen=True)
class Policy:
    """A host's trust settings (agent.conf): pinned keys, and whether unsigned data is
    accepted (``insecure_unsigned``). With keys, signed data is always checked against
    them; with ``insecure_unsigned`` and no key at all, nothing is checked."""

    keys: Mapping[str, Ed25519PublicKey]
    insecure_unsigned: bool = False


def check(value: ServiceSpec | StagedRelease | DeployItem, policy: Policy, now: float,
          seen: Mapping[str, Seen]) -> tuple[Verdict, dict[str, Seen]]:
    """One value against the policy and what was seen: (verdict, counters to record)."""
    signature = getattr(value, "signature", None)
    if policy.insecure_unsigned and (signature is None or not policy.keys):
        # No pinned key means no basis to check a signature either: accepted as is (and
        # before the payload is built: this runs for every value on every view).
        return Verdict(True, "not checked, accepted (insecure_unsigned = true)"), {}
    payload = payload_of(value)
    kind = payload["kind"]
    service = value.name if isinstance(value, ServiceSpec) else value.service
    key = f"{kind}/{service}"
    last = seen.get(key)
    verdict = verify(payload, signature, policy.keys, now,
                     last.counter if last else None)
    if not verdict:
        return verdict, {}
    node = value.node if isinstance(value, DeployItem) else None
    assert verdict.counter is not None
    if node is not None and last is not None and verdict.counter == last.counter and \
            last.node is not None and last.node != node:
        return Verdict(False, f"counter {verdict.counter} was accepted here on "
                              f"{last.node}: a copy of that item (a replay)"), {}
    if last is None or verdict.counter > last.counter:
        return verdict, {key: Seen(verdict.counter, node)}
    return verdict, {}


def where(value: ServiceSpec | StagedRelease | DeployItem) -> str:
    if isinstance(value, ServiceSpec):
        return layout.service(value.name)
    if isinstance(value, StagedRelease):
        return layout.staged(value.service)
    return layout.item(value.node)


def refused_item(item: DeployItem, reason: str) -> DeployItem:
    """A placeholder that blocks the queue at the refused item's place (as a malformed
    item does): nothing behind it proceeds, nothing acts on it."""
    return replace(item, state="invalid", reason=f"refused, not acted on: {reason}")


def check_all(spec: ServiceSpec | None, staged: StagedRelease | None,
              queue: Iterable[DeployItem], policy: Policy, now: float,
              seen: Mapping[str, Seen]
              ) -> tuple[ServiceSpec | None, StagedRelease | None, list[DeployItem],
                         list[str], dict[str, Seen]]:
    """A service's operator data, checked: refused values are dropped (spec, staged) or
    replaced by a blocking placeholder (deploy items); returns them with the refusals in
    words and the counters to record. Pure."""
    refusals: list[str] = []
    updates: dict[str, Seen] = {}
    merged = dict(seen)

    def accept(value):
        verdict, new = check(value, policy, now, merged)
        if not verdict:
            refusals.append(f"{where(value)}: {verdict.reason}")
            return False
        updates.update(new)
        merged.update(new)
        return True

    if spec is not None and not accept(spec):
        spec = None
    if staged is not None and not accept(staged):
        staged = None
    out: list[DeployItem] = []
    first: set[str] = set()
    for item in queue:
        if item.state == "invalid":
            out.append(item)
            break
        # Only a service's first queued item moves its counter: a later item (higher
        # counter) must not turn the earlier one into a "replay" on the next cycle.
        recorded = item.service not in first
        first.add(item.service)
        before = dict(updates)
        if not accept(item):
            out.append(refused_item(item, refusals[-1].split(": ", 1)[1]))
            break
        if not recorded:
            updates.clear()
            updates.update(before)
            merged.clear()
            merged.update(seen)
            merged.update(updates)
        out.append(item)
    return spec, staged, out, refusals, updates
