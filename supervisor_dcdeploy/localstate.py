"""What a host knows without the store: installed releases, the active version, the
``current`` symlink. Every write is atomic (temp file, fsync, rename, fsync of the
directory), so a ``kill -9`` at any point leaves either the old or the new state (S5)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .model import version_key

STATE_FILE = "state.json"
STATUS_FILE = "status.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new bytes, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """The host's ``state.json``. Not thread-safe: one agent worker owns it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / STATE_FILE
        self.services: dict[str, ServiceState] = {}
        self.problem: str | None = None
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            for svc, data in raw.get("services", {}).items():
                self.services[svc] = ServiceState(
                    active=data.get("active"), previous=data.get("previous"),
                    installed=dict(data.get("installed", {})),
                    verified=bool(data.get("verified", True)), spec=data.get("spec"))
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError, TypeError) as exc:
            # Unreadable state must not stop the host: the symlink and the release markers
            # are enough to rebuild it. Keep the bad file for a human to look at.
            self.problem = f"{self.path}: unreadable ({exc}); rebuilt from the release dirs"
            os.replace(self.path, self.path.with_suffix(".corrupt"))

    def get(self, svc: str) -> ServiceState:
        return self.services.get(svc, ServiceState())

    def update(self, svc: str, **changes: Any) -> ServiceState:
        """Change and save. The in-memory state changes even when saving fails (a full
        disk): the caller decides whether that failure matters; the agent logs it and goes
        on, because the ``current`` symlink is what supervisord starts."""
        new = replace(self.get(svc), **changes)
        self.services[svc] = new
        self.save()
        return new

    def save(self) -> None:
        data = {"services": {s: st.to_dict() for s, st in sorted(self.services.items())}}
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


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
        """Versions with a complete, verified release dir (its marker is written last)."""
        if not self.releases.is_dir():
            return []
        return sorted((p.name for p in self.releases.iterdir()
                       if (p / ".dcdeploy-release.json").is_file()), key=version_key)

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
            _fsync_dir(self.base)
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
