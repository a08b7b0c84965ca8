"""Removing a service, and the guard on ``quorum 0`` (``dcdeploy service delete|set``).

:func:`delete_refusal` is the pure decision (with its reason in words); :func:`service_delete`
reads the store, asks it, and deletes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .model import DeployItem, InvalidData, ServiceSpec
from .snapshot import read_specs
from .store import NoNode, Store


class DeleteRefused(Exception):
    pass


def quorum_zero_warning(name: str) -> str:
    return (f'quorum 0 for service "{name}" lets a deploy take every host of it down at '
            "once (nothing is kept serving)")


def quorum_refusal(name: str, quorum: int, force: bool) -> str | None:
    """Why ``service set NAME --quorum Q`` is refused, or None. Quorum 0 needs --force."""
    if quorum == 0 and not force:
        return (f"{quorum_zero_warning(name)}; give --force if that is what you want, or "
                "a quorum of at least 1")
    return None


@dataclass(frozen=True)
class DeleteState:
    """What the store says about the service to delete."""

    defined: bool
    queued: Sequence[str]  # deploy items for it
    online: Sequence[str]  # hosts registered in current/<name>
    dependents: Sequence[str]  # services whose depends_on names it


def delete_refusal(name: str, state: DeleteState, force: bool) -> str | None:
    """Why deleting ``name`` is refused, or None.

    Always refused: an undefined service, and one another service depends on (the
    dependency would dangle and every later ``service set`` would fail on it). Refused
    unless ``force``: a service with deploy items queued, or hosts online for it."""
    if not state.defined:
        return f'service "{name}" is not defined: nothing to delete'
    if state.dependents:
        return (f'service "{name}" is a dependency of {", ".join(sorted(state.dependents))}: '
                "redefine those without it first (dcdeploy service set ... --depends-on ...)")
    if force:
        return None
    if state.queued:
        return (f'service "{name}" is queued for deploy ({", ".join(state.queued)}): wait '
                "for it or abort it (dcdeploy abort), or give --force")
    if state.online:
        return (f'service "{name}" still has {len(state.online)} host(s) online for it '
                f'({", ".join(sorted(state.online))}): remove its [service:{name}] section '
                "from their agent.conf first, or give --force (they keep serving, unmanaged)")
    return None


def _queued(store: Store, name: str) -> list[str]:
    out = []
    for node in sorted(store.children("deploy")):
        try:
            raw, version = store.get(f"deploy/{node}")
            if DeployItem.parse(node, raw, version).service == name:
                out.append(node)
        except (NoNode, InvalidData):
            continue
    return out


def _children(store: Store, path: str) -> list[str]:
    try:
        return store.children(path)
    except NoNode:
        return []


def read_delete_state(store: Store, name: str) -> DeleteState:
    specs, _ = read_specs(store)
    defined = store.exists(f"services/{name}") is not None
    return DeleteState(defined=defined, queued=_queued(store, name),
                       online=_children(store, f"current/{name}"),
                       dependents=_dependents(specs, name))


def _dependents(specs: Mapping[str, ServiceSpec], name: str) -> list[str]:
    return sorted(s for s, spec in specs.items() if name in spec.depends_on and s != name)


def service_delete(store: Store, name: str, *, force: bool = False) -> list[str]:
    """Delete service ``name``; return notes for the operator. Raises
    :class:`DeleteRefused` with the reason (see :func:`delete_refusal`).

    With no host online its nodes go (spec, staged release, ready queue, gate, released).
    With ``--force`` and hosts online, only the spec goes and the staged release is
    cleared: the hosts' own presence nodes stay (their agents keep serving what runs and
    report the service as undefined), so no agent writes under a parent that vanished."""
    state = read_delete_state(store, name)
    refusal = delete_refusal(name, state, force)
    if refusal:
        raise DeleteRefused(refusal)
    notes = []
    try:
        store.delete(f"services/{name}")
    except NoNode:
        pass
    if state.online:
        try:
            store.set(f"staging/{name}", b"")
        except NoNode:
            pass
        notes.append(f"{len(state.online)} host(s) still run {name}: they keep serving it, "
                     "unmanaged, until it leaves their agent.conf")
    else:
        for base in ("staging", "current", "gate", "released"):
            try:
                store.delete(f"{base}/{name}", recursive=True)
            except NoNode:
                pass
    if state.queued:
        notes.append(f"deploy item(s) {', '.join(state.queued)} now show blocked: "
                     "dcdeploy abort clears the queue")
    return notes
