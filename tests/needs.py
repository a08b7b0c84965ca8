"""What a test needs from the machine (root, network namespaces, a tmpfs, ZooKeeper) and
what happens when it is missing: locally the test is skipped with the reason; under CI
(``CI`` set to true, as ``.ci/run`` runs) it fails with the reason, because a CI runner
that cannot run the fault tests must not go green without them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip (locally) or fail (under CI=true) the current test, naming ``reason``."""
    if on_ci():
        pytest.fail(f"cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def netns_reason() -> str | None:
    """Why namespace tests cannot run here, or None."""
    from supervisor_dcdeploy.lab import netns
    ok, why = netns.available()
    return None if ok else why


def zookeeper_reason() -> str | None:
    if not Path("/usr/share/zookeeper").is_dir():
        return "ZooKeeper not installed (apt-get install -y zookeeper)"
    return None


def require(*reasons: str | None) -> None:
    """Call :func:`unavailable` with the first reason that is not None."""
    for reason in reasons:
        if reason:
            unavailable(reason)
