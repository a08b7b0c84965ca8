"""What a host knows without the store: installed releases, the active version, the
``current`` symlink.

The local state lives in ``state.slots``: two fixed-size slots allocated (and written with
zeros) when the file is made, then only ever overwritten in place. An update goes to the slot
that does not hold the newest copy, with a sequence number one higher and a sha256 over the
slot, followed by ``fdatasync``. Overwriting bytes that already have blocks needs no new
blocks, so an update succeeds on a full disk (the failure the chaos bench found: a host that
could not record that its new version had passed its health check booted the old one). A
write cut in half leaves a slot whose checksum fails; the other slot, one update older, is
read instead. Readers take the valid slot with the highest sequence number (S5).

The one exception is a state that outgrows its slots: the file is then made again, larger,
by an atomic replace, which does need space. ``state.json`` (the format before the slots)
is read once and migrated. On copy-on-write filesystems (btrfs, ZFS) an in-place write does
allocate; there a full disk can still make an update fail, and the agent says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .files import atomic_write, fsync_dir
from .model import VERSION_RE, version_key

STATE_FILE = "state.slots"
LEGACY_STATE_FILE = "state.json"  # read once, migrated into STATE_FILE, then removed
STATUS_FILE = "status.json"

SLOT_SIZE = 64 * 1024  # bytes per slot; a state that does not fit makes the file larger
_MAGIC = b"DCDSLOT1"
_HEADER = struct.Struct(">8sQI32s")  # magic, sequence, payload length, sha256
_PAGE = 4096


# -- the slot file ----------------------------------------------------------------------

def _digest(seq: int, payload: bytes) -> bytes:
    return hashlib.sha256(struct.pack(">QI", seq, len(payload)) + payload).digest()


def encode_slot(seq: int, payload: bytes, slot_size: int) -> bytes:
    """One slot's bytes, padded with zeros to ``slot_size``; ValueError if it does not fit."""
    if _HEADER.size + len(payload) > slot_size:
        raise ValueError(f"state of {len(payload)} bytes does not fit a {slot_size}-byte slot")
    head = _HEADER.pack(_MAGIC, seq, len(payload), _digest(seq, payload))
    return (head + payload).ljust(slot_size, b"\0")


def decode_slot(raw: bytes) -> tuple[int, bytes] | None:
    """``(sequence, payload)`` of a slot, or None when it is empty, torn or not ours."""
    if len(raw) < _HEADER.size:
        return None
    magic, seq, length, digest = _HEADER.unpack_from(raw)
    if magic != _MAGIC or _HEADER.size + length > len(raw):
        return None
    payload = raw[_HEADER.size:_HEADER.size + length]
    if _digest(seq, payload) != digest:
        return None
    return seq, payload


@dataclass(frozen=True)
class SlotRead:
    """What a slot file holds: the newest valid payload (None if no slot is valid), its
    sequence number and slot index, the slot size, and a problem in words if any."""

    payload: bytes | None
    seq: int = 0
    index: int = -1
    slot_size: int = SLOT_SIZE
    problem: str | None = None


def read_slots(path: Path) -> SlotRead:
    """Read both slots of ``path`` and pick the valid one with the higher sequence number.
    FileNotFoundError if the file is missing; other OSErrors pass through."""
    data = path.read_bytes()
    if not data or len(data) % (2 * _PAGE):
        return SlotRead(None, problem=f"{path}: {len(data)} bytes is not two slots")
    size = len(data) // 2
    best: tuple[int, bytes, int] | None = None
    bad = []
    for index in (0, 1):
        slot = decode_slot(data[index * size:(index + 1) * size])
        if slot is None:
            if any(data[index * size:(index + 1) * size]):
                bad.append(index)
            continue
        if best is None or slot[0] > best[0]:
            best = (slot[0], slot[1], index)
    if best is None:
        return SlotRead(None, slot_size=size, problem=f"{path}: no slot is valid")
    problem = f"{path}: slot {bad[0]} is torn; using slot {best[2]}" if bad else None
    return SlotRead(best[1], best[0], best[2], size, problem)


class SlotFile:
    """Two pre-allocated slots written in place. Not thread-safe: one writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0
        self.index = -1  # slot holding the newest valid copy; -1: none
        self.slot_size = SLOT_SIZE

    def load(self) -> SlotRead:
        """Read the file and remember where the next write goes. FileNotFoundError if the
        file does not exist yet."""
        got = read_slots(self.path)
        self.slot_size = got.slot_size
        if got.payload is not None:
            self.seq, self.index = got.seq, got.index
        return got

    def create(self, payload: bytes) -> None:
        """Make the file (both slots allocated, ``payload`` in slot 0) by an atomic replace;
        this is the only write that needs free space."""
        size = self.slot_size
        while _HEADER.size + len(payload) > size:
            size *= 2
        self.seq += 1
        atomic_write(self.path, encode_slot(self.seq, payload, size) + b"\0" * size)
        self.slot_size, self.index = size, 0

    def write(self, payload: bytes) -> None:
        """Store ``payload`` as the newest copy: in place in the other slot, then
        ``fdatasync``. Makes the file when it is missing or too small."""
        if self.index < 0:
            # No valid copy known: reuse the file only if it is two slots of our size (its
            # blocks exist); a missing or misshapen file is made again.
            try:
                fits = self.path.stat().st_size == 2 * self.slot_size
            except FileNotFoundError:
                fits = False
            if not fits:
                self.create(payload)
                return
        if _HEADER.size + len(payload) > self.slot_size:
            self.create(payload)
            return
        index = 1 - self.index if self.index >= 0 else 0
        block = encode_slot(self.seq + 1, payload, self.slot_size)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            written = os.pwrite(fd, block, index * self.slot_size)
            if written != len(block):
                raise OSError(f"short write to {self.path}: {written} of {len(block)} bytes")
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.seq += 1
        self.index = index


def read_state(root: Path) -> dict[str, Any]:
    """The host's local state as a dict ``{"services": {...}}`` (for status readers: the
    rpcinterface, the testbed recorder). ``{}`` when there is none yet; ValueError naming
    the file when no copy is readable."""
    slots = root / STATE_FILE
    try:
        got = read_slots(slots)
    except FileNotFoundError:
        legacy = root / LEGACY_STATE_FILE
        try:
            data = json.loads(legacy.read_text())
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"{legacy}: not a JSON object")
        return data
    if got.payload is None:
        raise ValueError(got.problem or f"{slots}: unreadable")
    data = json.loads(got.payload)
    if not isinstance(data, dict):
        raise ValueError(f"{slots}: not a JSON object")
    return data


@dataclass(frozen=True)
class ServiceState:
    active: str | None = None
    previous: str | None = None
    installed: Mapping[str, str] = field(default_factory=dict)  # version -> sha256
    verified: bool = True  # False between pointing ``current`` and a passed health check
    spec: str | None = None  # last ServiceSpec JSON seen, for when the store is away

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous,
                "installed": dict(self.installed), "verified": self.verified,
                "spec": self.spec}


class LocalState:
    """The host's local state in ``state.slots``. Not thread-safe: one agent worker owns it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / STATE_FILE
        self.services: dict[str, ServiceState] = {}
        self.problem: str | None = None
        self._slots = SlotFile(self.path)
        self._legacy: Path | None = None  # state.json to remove once the slots hold it
        self._load()

    def _load(self) -> None:
        try:
            got = self._slots.load()
        except FileNotFoundError:
            self._migrate()
            return
        except OSError as exc:
            self.problem = f"{self.path}: unreadable ({exc}); rebuilt from the release dirs"
            return
        if got.payload is None:
            # Keep the file: it is allocated, so the next update can go in place.
            self.problem = f"{got.problem}; rebuilt from the release dirs"
            return
        if got.problem:
            self.problem = got.problem  # one slot torn, the other one read: worth a warning
        try:
            self._parse(json.loads(got.payload))
        except (ValueError, AttributeError, TypeError) as exc:
            self.services = {}
            self.problem = f"{self.path}: slot {got.index} unreadable ({exc}); rebuilt " \
                           "from the release dirs"

    def _migrate(self) -> None:
        """Read the old ``state.json`` once, write it into the slots, remove it. Before the
        slots exist (a fresh host) make them at once, while there may still be space."""
        legacy = self.root / LEGACY_STATE_FILE
        try:
            self._parse(json.loads(legacy.read_text()))
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError, TypeError) as exc:
            # Unreadable state must not stop the host: the symlink and the release markers
            # are enough to rebuild it. Keep the bad file for a human to look at.
            self.services = {}
            self.problem = f"{legacy}: unreadable ({exc}); rebuilt from the release dirs"
            os.replace(legacy, legacy.with_suffix(".corrupt"))
        self._legacy = legacy if legacy.exists() else None
        try:
            self.save()
        except OSError as exc:
            # No room to make the file: report it; the next update tries again.
            self.problem = f"cannot create {self.path}: {exc}"

    def _parse(self, raw: Any) -> None:
        for svc, data in raw.get("services", {}).items():
            self.services[svc] = ServiceState(
                active=data.get("active"), previous=data.get("previous"),
                installed=dict(data.get("installed", {})),
                verified=bool(data.get("verified", True)), spec=data.get("spec"))

    def get(self, svc: str) -> ServiceState:
        return self.services.get(svc, ServiceState())

    def update(self, svc: str, **changes: Any) -> ServiceState:
        """Change and save. The in-memory state changes even when saving fails (an I/O
        error; a full disk does not fail it, see the module doc): the caller decides whether
        that failure matters; the agent logs it and goes on."""
        new = replace(self.get(svc), **changes)
        self.services[svc] = new
        self.save()
        return new

    def save(self) -> None:
        """Write the whole state as the newest slot (see :class:`SlotFile`). OSError if the
        disk refuses it."""
        data = {"services": {s: st.to_dict() for s, st in sorted(self.services.items())}}
        self._slots.write(json.dumps(data, indent=1, sort_keys=True).encode())
        if self._legacy is not None:
            self._legacy.unlink(missing_ok=True)
            self._legacy = None


class ReleaseDir:
    """``<root>/<svc>/releases/<version>/`` and the ``<root>/<svc>/current`` symlink."""

    def __init__(self, root: Path, svc: str) -> None:
        self.base = root / svc
        self.releases = self.base / "releases"
        self.current = self.base / "current"
        self.cache = root / ".cache"

    def path(self, version: str) -> Path:
        return self.releases / version

    def installed(self) -> list[str]:
        """Versions with a complete, verified release dir (its marker is written last).
        Only names that are versions: an unpack's ``.tmp-<version>-*`` directory holds the
        marker for a moment before its rename, and one left by a crash keeps it."""
        if not self.releases.is_dir():
            return []
        return sorted((p.name for p in self.releases.iterdir()
                       if VERSION_RE.fullmatch(p.name)
                       and (p / ".dcdeploy-release.json").is_file()), key=version_key)

    def active(self) -> str | None:
        """The version ``current`` points at, or None."""
        try:
            return Path(os.readlink(self.current)).name
        except OSError:
            return None

    def prepare_current(self, version: str) -> Path:
        """Make the new symlink beside ``current`` (the step that can fail on a full disk),
        so that a switch can give up before its service is stopped."""
        target = Path("releases") / version
        if not (self.base / target).is_dir():
            raise FileNotFoundError(f"release {version} is not installed at {self.base / target}")
        tmp = self.base / f".current.{os.getpid()}.{version}"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        return tmp

    def commit_current(self, prepared: Path) -> None:
        """Atomically replace ``current`` with a prepared symlink (rename)."""
        os.replace(prepared, self.current)
        try:
            fsync_dir(self.base)
        except OSError:
            pass  # the rename is done; durability is best effort on a failing disk

    def point_current(self, version: str) -> None:
        """Atomically repoint ``current`` at ``releases/<version>`` (symlink + rename)."""
        self.commit_current(self.prepare_current(version))

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Delete the oldest installed releases beyond ``keep``, never one in ``protect``."""
        import shutil
        versions = self.installed()
        removable = [v for v in versions if v not in protect]
        doomed = removable[: max(0, len(versions) - keep)]
        for version in doomed:
            shutil.rmtree(self.path(version), ignore_errors=True)
        return doomed
