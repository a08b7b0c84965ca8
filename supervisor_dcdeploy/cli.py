"""``dcdeploy``: the operator's command line (define services, stage, deploy, watch)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import logs, ops, trust
from .model import MAX_SIZE_BYTES, HealthCheck, InvalidData
from .p2p.engine import ENGINES
from .snapshot import read_spec
from .store import Store, StoreError, StoreURLError, open_store, store_url_from


DEFAULT_SEED_DIR = Path("/var/lib/dcdeploy/seed")


class CLIError(Exception):
    pass


@contextmanager
def connected(args: argparse.Namespace) -> Iterator[Store]:
    url = store_url_from(args.store)
    try:
        store = open_store(url)
    except StoreURLError as exc:
        raise CLIError(str(exc)) from None
    store.start(timeout=args.timeout)
    try:
        yield store
    finally:
        store.stop()


def _positive_size(text: str) -> int:
    """``--size``: a whole number of bytes in [1, MAX_SIZE_BYTES] (what hosts accept)."""
    if not re.fullmatch(r"[0-9]{1,19}", text.strip()) or not 1 <= int(text) <= MAX_SIZE_BYTES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size in bytes from 1 to {MAX_SIZE_BYTES}")
    return int(text)


def _health(args: argparse.Namespace) -> HealthCheck:
    """The check as the store holds it: a path and a port variable, or a local check's name
    (the hosts' agent.conf says what runs). Old-style loopback URLs / HOST:PORT are converted
    by the model; a command line is refused."""
    given = [(k, v) for k, v in (("http", args.health_http), ("tcp", args.health_tcp),
                                 ("cmd", args.health_cmd)) if v]
    if len(given) > 1:
        raise CLIError("give at most one of --health-http, --health-tcp, --health-cmd")
    if not given:
        return HealthCheck()
    kind, value = given[0]
    data: dict = {"kind": kind, "timeout": args.health_timeout}
    if kind == "http" and value.startswith("/"):
        data.update(path=value, port=args.health_port)
    elif kind == "http":
        data["target"] = value  # old style: only a loopback URL with a {var} port is read
    elif kind == "tcp" and ":" in value:
        data["target"] = value  # old style HOST:PORT, likewise
    elif kind == "tcp":
        data["port"] = int(value) if value.isdigit() else value
    else:
        data["check"] = value
    try:
        return HealthCheck.parse(f"--health-{kind}", data)
    except InvalidData as exc:
        raise CLIError(str(exc) if kind != "cmd" else
                       f"--health-cmd {value!r}: give the name of a [check:NAME] section of "
                       "the hosts' agent.conf (its argv runs there, without a shell); a "
                       "command line is not accepted") from None


def cmd_init(args: argparse.Namespace) -> int:
    from .store.acl import CredentialError, read_identity
    hosts: dict[str, str] = {}
    for spec in args.host_identity:
        name, sep, path = spec.partition(":")
        if not sep or not name or not path:
            raise CLIError(f"--host-identity {spec!r}: expected NAME:FILE "
                           "(FILE holds that host's user:password)")
        if name in hosts:
            raise CLIError(f"--host-identity: host {name!r} given twice")
        try:
            hosts[name] = read_identity(path, f"host {name}'s credential file").digest_id
        except CredentialError as exc:
            raise CLIError(str(exc)) from None
    previous = None
    if args.previous_operator:
        try:
            previous = read_identity(args.previous_operator, "previous operator's file")
        except CredentialError as exc:
            raise CLIError(str(exc)) from None
    with connected(args) as store:
        changed = ops.init(store, hosts, previous)
    print(f"store set up for the operator and {len(hosts)} host(s); {changed} node(s) "
          "created or changed")
    return 0


def _signing(args: argparse.Namespace) -> tuple[trust.Signer | None, float | None]:
    """The operator key (--sign-key, else $DCDEPLOY_SIGN_KEY) and the --expires lifetime.
    Without a key the write is unsigned, and this says so."""
    try:
        signer = trust.load_signer(args.sign_key) if args.sign_key else trust.default_signer()
        expires = trust.parse_duration(args.expires) if args.expires else None
    except trust.TrustError as exc:
        raise CLIError(str(exc)) from None
    if signer is None:
        print(f"dcdeploy: warning: no signing key (--sign-key FILE or ${trust.SIGN_KEY_ENV}): "
              "writing unsigned data, which hosts that pin keys refuse", file=sys.stderr)
    return signer, expires


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        private, public, keyid = trust.generate(args.out, args.name)
    except (trust.TrustError, OSError) as exc:
        raise CLIError(str(exc)) from None
    print(f"key {keyid}: private {private} (keep it secret; sign with --sign-key {private} "
          f"or {trust.SIGN_KEY_ENV}), public {public} (copy to every host's trusted_keys)")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from . import svcadmin
    if args.action == "set":
        refusal = svcadmin.quorum_refusal(args.name, args.quorum, args.force)
        if refusal:
            raise CLIError(refusal)
    with connected(args) as store:
        if args.action == "delete":
            try:
                notes = svcadmin.service_delete(store, args.name, force=args.force)
            except svcadmin.DeleteRefused as exc:
                raise CLIError(str(exc)) from None
            print(f"service {args.name} deleted" + "".join(f"; {n}" for n in notes))
            return 0
        if args.action == "set":
            deps = [d.strip() for d in (args.depends_on or "").split(",") if d.strip()]
            signer, expires = _signing(args)
            spec = ops.service_set(store, args.name, program=args.program, quorum=args.quorum,
                                   depends_on=deps, max_parallel=args.max_parallel,
                                   health=_health(args), healthy_secs=args.healthy_secs,
                                   preload=args.preload, signer=signer, expires=expires,
                                   policy=_policy(args), verify_peers=args.verify_peers)
            print(f"service {spec.name}: program {spec.program}, quorum {spec.quorum}, "
                  f"max_parallel {spec.max_parallel}, depends on "
                  f"{', '.join(spec.depends_on) or 'nothing'}" +
                  "".join(f", {k} {v}" for k, v in spec.policy.to_dict().items()))
            if spec.quorum == 0:
                print(f"dcdeploy: warning: {svcadmin.quorum_zero_warning(spec.name)}",
                      file=sys.stderr)
            return 0
        data = ops.status(store)["services"]
        if args.action == "show":
            if args.name not in data:
                raise CLIError(f'service "{args.name}" is not defined')
            print(json.dumps(data[args.name], indent=2))
            return 0
        for name, svc in data.items():
            print(f"{name:<16} quorum {svc['quorum']!s:<3} max_parallel "
                  f"{svc['max_parallel']!s:<3} depends on {','.join(svc['depends_on']) or '-'}")
        return 0


def cmd_stage(args: argparse.Namespace) -> int:
    if args.path:
        return _stage_path(args)
    if not args.url or not args.sha256:
        raise CLIError("stage needs --url URL and --sha256 HEX, or --path FILE_OR_DIR")
    signer, expires = _signing(args)
    with connected(args) as store:
        size = args.size
        if size is None:
            # Hosts refuse a release without a size (it bounds their downloads): learn it
            # here, once the service is known to exist.
            from .fetch import probe_size
            spec, problem = read_spec(store, args.name)
            if spec is None:
                raise CLIError(problem or f'service "{args.name}" is not defined (define it '
                                          f"with: dcdeploy service set {args.name} ...)")
            found = probe_size(args.url)
            if found is None:
                raise CLIError("stage: cannot learn the artifact's size from --url (no local "
                               "file, no Content-Length answered to HEAD): give it with "
                               "--size BYTES")
            size, source = found
            print(f"size {size} bytes (from {source})", file=sys.stderr)
        release = ops.stage(store, args.name, args.version, sha256=args.sha256,
                            urls=args.url, size=size, signer=signer, expires=expires)
    print(f"staged {args.name} {release.version} (sha256 {release.sha256[:16]}..., "
          f"{release.size} bytes): hosts are fetching it now")
    return 0


def _stage_path(args: argparse.Namespace) -> int:
    """Stage a build host's file or directory through the swarm: make the torrent, check
    the seeder has it, then publish the staged release (hosts start at once)."""
    from .p2p import seed
    path = Path(args.path)
    if not path.exists():
        raise CLIError(f"--path {path}: no such file or directory")
    if args.sha256 or args.size is not None:
        raise CLIError("--sha256 and --size go with --url: with --path they are computed")
    signer, expires = _signing(args)
    info = seed.status(args.seed_dir)
    if not info:
        raise CLIError(f"no seeder is running in {args.seed_dir}: start one with "
                       "dcdeploy seed start --dir DIR --host NAME --address ADDR")
    with connected(args) as store:
        spec, problem = read_spec(store, args.name)  # refuse before hashing for minutes
        if spec is None:
            raise CLIError(problem or f'service "{args.name}" is not defined '
                                      f"(define it with: dcdeploy service set {args.name} ...)")

        def progress(done: int, total: int) -> None:
            print(f"\rhashing {path.name}: {done}/{total} pieces", end="", file=sys.stderr,
                  flush=True)

        staged = seed.stage(path, webseeds=args.webseed, progress=progress)
        print(file=sys.stderr)
        seed.add_seed(args.seed_dir, info["rpc_url"], staged)
        # A single file's web seed is its plain URL too (BEP 19): hosts without a
        # transmission-daemon fetch from there.
        fallback = list(args.webseed) if path.is_file() else []
        release = ops.stage(store, args.name, args.version, sha256=staged.sha256,
                            urls=(args.url or []) + fallback, size=staged.size,
                            torrent=staged.metainfo_b64, signer=signer, expires=expires)
    print(f"staged {args.name} {release.version} through the swarm (infohash "
          f"{staged.infohash}, {staged.size} bytes, sha256 {staged.sha256[:16]}...): "
          "seeding from this host; hosts are fetching it now")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from .p2p import seed
    if args.action == "start":
        if not args.host or not args.address:
            raise CLIError("seed start needs --host NAME and --address ADDR (what peers dial)")
        url = store_url_from(args.store)
        try:
            open_store(url)  # validates the URL before a process is started with it
        except StoreURLError as exc:
            raise CLIError(str(exc)) from None
        info = seed.start(seed.SeedConfig(dir=args.dir, store_url=url, host=args.host,
                                          address=args.address, rack=args.rack,
                                          rpc_port=args.rpc_port, peer_port=args.peer_port,
                                          tracker_port=args.tracker_port,
                                          engine=args.engine))
        print(f"seeder running: pid {info['pid']}, RPC {info['rpc_url']}")
    elif args.action == "stop":
        print("seeder stopped" if seed.stop(args.dir) else f"no seeder running in {args.dir}")
    else:
        info = seed.status(args.dir)
        print(json.dumps(info) if info else f"no seeder running in {args.dir}")
        return 0 if info else 1
    return 0


def _policy(args: argparse.Namespace):
    """The rollout policy of ``service set``'s flags (docs/policy.md)."""
    from .model import InvalidData
    from .policy import Policy
    data: dict = {}
    if args.max_down_per_rack is not None:
        data["max_down_per_rack"] = args.max_down_per_rack
    if args.rack_order is not None:
        racks = [r.strip() for r in args.rack_order.split(",") if r.strip()]
        data["rack_order"] = racks or True
    try:
        return Policy.parse("service set", data)
    except InvalidData as exc:
        raise CLIError(str(exc).replace("field 'max_down_per_rack'", "--max-down-per-rack")
                       .replace("field 'rack_order'", "--rack-order")) from None


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.wait_timeout is not None and not args.wait:
        raise CLIError("--timeout goes with --wait (deploy NAME... --wait --timeout SECS)")
    _check_wait_timeout(args)  # before queueing: a refused option must not leave a deploy
    overrides = _deploy_overrides(args)
    signer, expires = _signing(args)
    with connected(args) as store:
        try:
            planned = ops.plan(store, args.names, **overrides)
        except ops.OpError:
            raise  # what deploy itself would refuse, with the same reason
        except Exception as exc:  # noqa: BLE001 - a failed prediction never blocks a deploy
            print(f"dcdeploy: warning: no prediction ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            planned = {"items": [], "total_s": None}
        predicted = {i["service"]: i["predicted_s"] for i in planned["items"]
                     if i["item"].startswith("(new ")}
        items = ops.deploy(store, args.names, signer=signer, expires=expires,
                           predicted=predicted, **overrides)
        for item in items:
            print(f"queued {item.node}: {item.service} -> {item.version}"
                  + (f", predicted {_secs(item.predicted_s)}" if item.predicted_s is not None
                     else ", no prediction (blocked now)")
                  + (f", canaries {item.canary} (soak {item.soak_secs:g} s"
                     + (", then " if item.soak_secs else ": ") + "dcdeploy approve "
                     + item.service + ")" if item.canary else "")
                  + _overrides_note({k: v for k, v in ops.item_overrides(item).items()
                                     if k != "host_parallel"}))
        total = planned["total_s"]
        print(f"predicted total {_secs(total)}" if total is not None
              else "predicted total unknown (an item is blocked now: dcdeploy plan says why)")
        sys.stdout.flush()
        if not args.wait:
            return 0
        return _wait(args, store, [i.node for i in items])


def _deploy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What ``deploy_options`` parsed, checked before connecting (a refusal names the flag
    and the value), as keyword arguments of both ``ops.deploy`` and ``ops.plan``: the plan
    then describes the deploy these flags would run."""
    ops.check_canary(args.canary, args.soak)
    ops.check_host_parallel(args.host_parallel)
    racks = {"max_down_per_rack": args.max_down_per_rack,
             "rack_order": _rack_order_arg(args.rack_order)}
    ops.rack_override(**racks)
    return {"canary": args.canary, "soak_secs": args.soak,
            "host_parallel": args.host_parallel, **racks}


def _check_wait_timeout(args: argparse.Namespace) -> None:
    if args.wait_timeout is not None and not args.wait_timeout > 0:
        raise CLIError(f"--timeout {args.wait_timeout:g}: give a number of seconds above 0")


def _wait(args: argparse.Namespace, store: Store, items: list[str]) -> int:
    from .waitdeploy import wait_items
    return wait_items(store, items, out=sys.stdout, err=sys.stderr, tty=sys.stdout.isatty(),
                      timeout=args.wait_timeout)


def cmd_wait(args: argparse.Namespace) -> int:
    from .waitdeploy import item_node, read_record
    _check_wait_timeout(args)
    with connected(args) as store:
        if args.item:
            node = item_node(args.item)
            if store.exists(f"deploy/{node}") is None and read_record(store, node) is None:
                raise CLIError(f"no deploy item {node} in the queue or in history "
                               "(dcdeploy status and dcdeploy history list them)")
            items = [node]
        else:
            items = sorted(store.children("deploy"), key=lambda n: n.rpartition("-")[2])
            if not items:
                print("the deploy queue is empty: nothing to wait for")
                return 0
        return _wait(args, store, items)


def cmd_pause(args: argparse.Namespace) -> int:
    with connected(args) as store:
        items = ops.pause_all(store)
        print(f"paused {', '.join(f'{i.node} ({i.service} {i.version})' for i in items)}: "
              "hosts mid-switch finish, nobody starts another")
        return 0


def cmd_resume(args: argparse.Namespace) -> int:
    signer, expires = _signing(args)
    with connected(args) as store:
        item, retarget = ops.resume(store, signer=signer, expires=expires)
        extra = f", now targeting the staged {retarget}" if retarget else ""
        print(f"resumed {item.node} ({item.service}){extra}")
        return 0


def cmd_abort(args: argparse.Namespace) -> int:
    with connected(args) as store:
        nodes = ops.abort(store)
        print(f"aborted {len(nodes)} queued item(s): {', '.join(nodes)}")
        return 0


def _fetch_note(svc: dict[str, Any]) -> str:
    fetch = svc.get("fetch") or {}
    if fetch.get("state") in (None, "installed"):
        return ""
    note = f"[{fetch.get('version')} {fetch['state']}"
    return note + (f": {fetch['error']}]" if fetch.get("error") else "]")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Control characters from the store (an escape sequence in a reason) shown as \\xNN,
    never sent to the operator's terminal."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render_status(data: dict[str, Any]) -> str:
    lines = ["SERVICE          STAGED        VERSIONS (hosts)                 READY-QUEUE"]
    for name, svc in data["services"].items():
        staged = svc["staged"]["version"] if svc["staged"] else "-"
        versions = ", ".join(f"{v}:{n}" for v, n in sorted(svc["versions"].items())) or "-"
        lines.append(f"{name:<16} {staged:<13} {versions:<32} {len(svc['staging'])}")
    lines += ["", "DEPLOY QUEUE"]
    if not data["deploy"]:
        lines.append("  (empty)")
    for item in data["deploy"]:
        reason = f"  ({item['reason']})" if item["reason"] else ""
        lines.append(f"  {item['item']}  {item['service']:<14} {item['version']:<12} "
                     f"{item['state']}{reason}{_overrides_note(item.get('overrides'))}")
    lines += ["", "HOST             RACK     ONLINE  SERVICES"]
    for name, host in data["hosts"].items():
        svcs = " ".join(f"{s}={v['version'] or '-'}({v['state']})" + _fetch_note(v)
                        for s, v in host["services"].items())
        lines.append(f"{name:<16} {host['rack'] or '-':<8} {'yes' if host['online'] else 'NO':<7} "
                     f"{svcs}")
    if data.get("problems"):
        lines += ["", "PROBLEMS (invalid data in the store, not acted on)"]
        lines += [f"  {p}" for p in data["problems"]]
    return printable("\n".join(lines))


def _overrides_note(overrides: dict[str, Any] | None) -> str:
    """`` [max_down_per_rack 1, rack_order r1,r0]``: what a deploy item sets over its spec."""
    if not overrides:
        return ""
    parts = [f"{k} " + (",".join(v) if isinstance(v, list) else
                        "sorted" if v is True else str(v)) for k, v in overrides.items()]
    return f"  [{', '.join(parts)}]"


def _rack_order_arg(value: str | None) -> bool | list[str] | None:
    """``--rack-order``: absent None; without a list, racks sorted (True); else the names,
    as ``service set --rack-order`` takes them."""
    if value is None:
        return None
    racks = [r.strip() for r in value.split(",") if r.strip()]
    return racks or True


def cmd_status(args: argparse.Namespace) -> int:
    with connected(args) as store:
        while True:
            data = ops.status(store)
            if args.json:
                print(json.dumps(data, sort_keys=True, allow_nan=False))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(render_status(data))
            sys.stdout.flush()
            if not args.watch:
                return 0
            time.sleep(args.watch)


def cmd_hosts(args: argparse.Namespace) -> int:
    with connected(args) as store:
        data = ops.status(store)
        if args.json:
            print(json.dumps(data["hosts"], sort_keys=True, allow_nan=False))
        else:
            print("\n".join(render_status(data).split("\n\n")[2:3]))
        return 0


def _secs(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) and \
        not isinstance(value, bool) else "-"


def timing_of(record: dict[str, Any]) -> dict[str, Any]:
    """A history record's predicted and actual seconds (actual: from the first take-down
    to done), None where unknown; a record's fields are whatever the store held."""
    def num(key: str) -> float | None:
        value = record.get(key)
        return float(value) if isinstance(value, (int, float)) and \
            not isinstance(value, bool) else None
    started, done = num("started_at"), num("updated")
    actual = done - started if started is not None and done is not None and \
        record.get("state") == "done" else None
    return {"predicted_s": num("predicted_s"), "actual_s": actual}


def cmd_history(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CLIError(f"--limit {args.limit}: give a number of items, 1 or more")
    with connected(args) as store:
        items = ops.history(store, args.limit)
        if args.json:
            print(json.dumps([{**i, **timing_of(i)} for i in items], allow_nan=False))
        else:
            for item in items:  # fields of a record are whatever the store held: str() them
                t = timing_of(item)
                times = f"predicted {_secs(t['predicted_s'])}, actual {_secs(t['actual_s'])}"
                print(printable(f"{item['item']}  {str(item.get('service', '?')):<14} "
                                f"{str(item.get('version', '?')):<12} {item.get('state')}  "
                                f"{times}  {item.get('reason') or ''}"))
        return 0


def cmd_approve(args: argparse.Namespace) -> int:
    signer, expires = _signing(args)
    with connected(args) as store:
        item = ops.approve(store, args.name, signer=signer, expires=expires)
    print(f"approved {item.node} ({item.service} {item.version}): the rest of its hosts "
          "may switch")
    return 0


def render_plan(data: dict[str, Any]) -> str:
    lines = []
    by_item = {i["item"]: i for i in data["items"]}
    for w, wave in enumerate(data["waves"]):
        lines.append(f"wave {w}:")
        for node in wave:
            i = by_item[node]
            limits = ", ".join(f"{k} {v}" for k, v in i["limits"].items())
            if i["blocked"]:
                lines.append(f"  {node}  {i['service']} -> {i['version']}: blocked: "
                             f"{i['blocked']}")
                continue
            extra = (f", soak {i['soak_s']:g} s" if i["soak_s"] else "") + \
                (", waits for dcdeploy approve" if i["waits_for_approve"] else "")
            lines.append(f"  {node}  {i['service']} -> {i['version']}: {i['hosts']} hosts "
                         f"in {i['batches']} batches of up to {i['k']} ({limits}){extra}; "
                         f"{_secs(i['batch_s'])} per batch ({i['timing_source']}); predicted "
                         f"{_secs(i['predicted_s'])}, from {_secs(i['start_s'])} to "
                         f"{_secs(i['finish_s'])}")
            if i.get("host_parallel", data["host_parallel"]) != data["host_parallel"]:
                lines.append(f"    host_parallel {i['host_parallel']} (queued with it)")
            racks = {k: v for k, v in (i.get("rack_policy") or {}).items() if v is not None}
            if racks:
                lines.append(f"    racks: {_overrides_note(racks)[2:]}")
            if i["host_order"]:
                lines.append(f"    order: {' '.join(i['host_order'])}")
    for b in data["blocked"]:
        lines.append(f"not in a wave: {b['item']} {b['service']}: {b['reason']}")
    for problem in data.get("timing_problems", []):
        lines.append(f"ignored switch record: {problem}")
    lines.append(f"predicted total {_secs(data['total_s'])} (dependency chains "
                 f"{_secs(data['dag_bound_s'])}, busiest host {_secs(data['host_bound_s'])} "
                 f"with host_parallel {data['host_parallel']}; "
                 f"in series {_secs(data['series_s'])})")
    return printable("\n".join(lines))


def cmd_plan(args: argparse.Namespace) -> int:
    overrides = _deploy_overrides(args)
    with connected(args) as store:
        data = ops.plan(store, args.names, **overrides)
    print(json.dumps(data, sort_keys=True, allow_nan=False) if args.json else render_plan(data))
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    from .metrics import ListenError
    from .web import ListenRefused, check_listen, serve
    try:
        check_listen(args.listen, args.allow_remote)
    except (ListenRefused, ListenError) as exc:
        raise CLIError(str(exc)) from None
    with connected(args) as store:
        serve(store, args.listen, args.allow_remote,
              ready=lambda url: print(f"dcdeploy web: serving {url} (Ctrl-C stops)",
                                      flush=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .lab.demo import run_demo
    return run_demo(hosts=args.hosts, keep=args.keep)


def cmd_testbed(args: argparse.Namespace) -> int:
    from .lab.testbed.cli import main as testbed_main
    return testbed_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcdeploy", description=__doc__)
    parser.add_argument("--store", help="zk://host:port[,host:port...]/root "
                                        "(default: $DCDEPLOY_STORE)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the store")
    sub = parser.add_subparsers(dest="command", required=True)

    ini = sub.add_parser("init", help="set up the store's access control (ZooKeeper ACLs) "
                                      "with the operator's credentials; idempotent")
    ini.add_argument("--host-identity", action="append", default=[], metavar="NAME:FILE",
                     help="a host and the private file with its store user:password "
                          "(repeatable; hosts left out lose their access)")
    ini.add_argument("--previous-operator", metavar="FILE",
                     help="rotating the operator: the old operator's credential file (the "
                          "store URL names the new one)")
    ini.set_defaults(func=cmd_init)

    def signing_options(p: argparse.ArgumentParser, kind: str) -> None:
        days = int(trust.DEFAULT_EXPIRES[kind] // trust.DAY)
        p.add_argument("--sign-key", metavar="FILE",
                       help=f"operator private key (default: ${trust.SIGN_KEY_ENV})")
        p.add_argument("--expires", metavar="DURATION",
                       help=f"signature lifetime, e.g. 7d, 12h (default: {days}d)")

    kg = sub.add_parser("keygen", help="make an operator key pair (Ed25519, PEM)")
    kg.add_argument("--out", type=Path, required=True, help="directory for NAME.key, NAME.pub")
    kg.add_argument("--name", default="operator")
    kg.set_defaults(func=cmd_keygen)

    svc = sub.add_parser("service", help="define and list services")
    svc_sub = svc.add_subparsers(dest="action", required=True)
    sset = svc_sub.add_parser("set", help="define or replace a service")
    sset.add_argument("name")
    sset.add_argument("--program", help="supervisord program name (default: the service name)")
    sset.add_argument("--quorum", type=int, required=True,
                      help="hosts that must stay online")
    sset.add_argument("--depends-on", default="", help="comma-separated services")
    sset.add_argument("--max-parallel", type=int, default=1)
    sset.add_argument("--health-http", metavar="PATH",
                      help="GET PATH on each host's own address, at --health-port")
    sset.add_argument("--health-port", metavar="KEY", default="port",
                      help="the [service:NAME] key holding the port on each host "
                           "(default: port)")
    sset.add_argument("--health-tcp", metavar="KEY",
                      help="connect to each host's own address at the port in KEY")
    sset.add_argument("--health-cmd", metavar="CHECK",
                      help="run the [check:CHECK] argv of each host's agent.conf")
    sset.add_argument("--health-timeout", type=float, default=2.0)
    sset.add_argument("--healthy-secs", type=float, default=0.0,
                      help="the check must hold this long after start")
    sset.add_argument("--preload", action="store_true",
                      help="warm releases into the page cache before joining the queue")
    sset.add_argument("--max-down-per-rack", type=int, metavar="K",
                      help="at most K hosts of one rack switching at once")
    sset.add_argument("--rack-order", nargs="?", const="", metavar="R1,R2,...",
                      help="finish one rack before the next: in this order (racks not "
                           "named follow, sorted), or sorted when no list is given")
    sset.add_argument("--verify-peers", action="store_true",
                      help="at the gate, count only hosts that answer a probe of their "
                           "published endpoint (agent.conf probe_address)")
    signing_options(sset, "service")
    sset.add_argument("--force", action="store_true", help="accept --quorum 0")
    sdel = svc_sub.add_parser("delete", help="remove a service (refused while it is queued "
                                             "or has hosts online, unless --force)")
    sdel.add_argument("name")
    sdel.add_argument("--force", action="store_true")
    svc_sub.add_parser("list", help="list services")
    sshow = svc_sub.add_parser("show", help="one service as JSON")
    sshow.add_argument("name")
    svc.set_defaults(func=cmd_service)

    stage = sub.add_parser("stage", help="stage a release; hosts start fetching at once")
    stage.add_argument("name")
    stage.add_argument("version")
    stage.add_argument("--url", action="append", help="http(s):// or file:// (repeatable)")
    stage.add_argument("--sha256")
    stage.add_argument("--size", type=_positive_size, metavar="BYTES",
                       help="the artifact's size (with --url; default: the local file's "
                            "size or the Content-Length a HEAD request answers)")
    stage.add_argument("--path", help="stage a local file or dir through the swarm "
                                       "(needs a seeder: dcdeploy seed start)")
    stage.add_argument("--webseed", action="append", default=[], help="BEP 19 web seed URL")
    stage.add_argument("--seed-dir", type=Path, default=DEFAULT_SEED_DIR,
                       help=f"the build host's seeder directory (default {DEFAULT_SEED_DIR})")
    signing_options(stage, "release")
    stage.set_defaults(func=cmd_stage)

    sd = sub.add_parser("seed", help="the build host's seeder: transmission-daemon + tracker")
    sd.add_argument("action", choices=["start", "stop", "status"])
    sd.add_argument("--dir", type=Path, default=DEFAULT_SEED_DIR)
    sd.add_argument("--host", help="this build host's name in the store")
    sd.add_argument("--address", help="the address peers dial")
    sd.add_argument("--rack", default="build")
    sd.add_argument("--rpc-port", type=int, default=9091)
    sd.add_argument("--peer-port", type=int, default=51413)
    sd.add_argument("--tracker-port", type=int, default=6969)
    sd.add_argument("--engine", choices=ENGINES, default="transmission",
                    help="the BitTorrent engine (docs/distribution.md, Engines)")
    sd.set_defaults(func=cmd_seed)

    dep = sub.add_parser("deploy", help="queue staged versions in dependency order")
    dep.add_argument("names", nargs="+")
    signing_options(dep, "deploy")
    dep.add_argument("--wait", action="store_true",
                     help="show progress; exit 0 when done, 1 when an item failed, "
                          "3 on --timeout")
    dep.add_argument("--timeout", dest="wait_timeout", type=float, metavar="SECS",
                     help="with --wait: stop waiting after SECS (exit 3)")

    def deploy_options(p: argparse.ArgumentParser) -> None:
        """How the deploy runs: ``deploy`` acts on them, ``plan`` predicts with them."""
        p.add_argument("--host-parallel", type=int, metavar="N",
                       help="a host may switch up to N of its services at once (default 1)")
        p.add_argument("--canary", type=int, default=0, metavar="N",
                       help="the first N hosts (spread over racks) switch, then the item "
                            "holds (docs/policy.md)")
        p.add_argument("--soak", type=float, default=0.0, metavar="SECS",
                       help="with --canary: hold this long after the canaries serve the new "
                            "version (0: until dcdeploy approve)")
        p.add_argument("--max-down-per-rack", type=int, metavar="K",
                       help="for this deploy: at most K hosts of one rack switching at once "
                            "(over the service's own)")
        p.add_argument("--rack-order", nargs="?", const="", metavar="R1,R2,...",
                       help="for this deploy: finish one rack before the next, in this order "
                            "(racks not named follow, sorted), or sorted when no list is given")
    deploy_options(dep)
    dep.set_defaults(func=cmd_deploy)
    apr = sub.add_parser("approve", help="end the canary hold of a service's queued deploy")
    apr.add_argument("name")
    signing_options(apr, "deploy")
    apr.set_defaults(func=cmd_approve)
    pl = sub.add_parser("plan", help="what deploying services now would do: waves, batches, "
                                     "predicted duration (docs/policy.md)")
    pl.add_argument("names", nargs="+")
    pl.add_argument("--json", action="store_true", help="the schema in docs/policy.md")
    deploy_options(pl)
    pl.set_defaults(func=cmd_plan)
    wt = sub.add_parser("wait", help="wait for queued deploy items (all, or ITEM): exit 0 "
                                     "done, 1 failed, 3 timeout")
    wt.add_argument("item", nargs="?", help="item-0000000007 or 7 (default: the whole queue)")
    wt.add_argument("--timeout", dest="wait_timeout", type=float, metavar="SECS")
    wt.set_defaults(func=cmd_wait)

    st = sub.add_parser("status", help="services, deploy queue and hosts")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECS")
    st.set_defaults(func=cmd_status)
    hosts = sub.add_parser("hosts", help="hosts and what they run")
    hosts.add_argument("--json", action="store_true")
    hosts.set_defaults(func=cmd_hosts)
    hist = sub.add_parser("history", help="finished deploy items")
    hist.add_argument("--json", action="store_true")
    hist.add_argument("--limit", type=int, default=20)
    hist.set_defaults(func=cmd_history)
    for name, func, text in (("pause", cmd_pause, "stop new take-downs"),
                             ("resume", cmd_resume, "continue a paused or failed deploy "
                                                    "(retargets to a newly staged fix)"),
                             ("abort", cmd_abort, "drop the whole deploy queue")):
        action = sub.add_parser(name, help=text)
        action.set_defaults(func=func)
        if name == "resume":
            signing_options(action, "deploy")
    web = sub.add_parser("web", help="a live, read-only page of the fleet (docs/web.md)")
    web.add_argument("--listen", default="127.0.0.1:8700", metavar="HOST:PORT",
                     help="where to serve the page (default 127.0.0.1:8700)")
    web.add_argument("--allow-remote", action="store_true",
                     help="allow a non-loopback --listen (the page has no authentication: "
                          "put a reverse proxy in front, docs/web.md)")
    web.set_defaults(func=cmd_web)
    demo = sub.add_parser("demo", help="run a local demo data center end to end")
    demo.add_argument("--hosts", type=int, default=4)
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=cmd_demo)
    bed = sub.add_parser("testbed", help="hosts in network namespaces, a ZooKeeper ensemble, "
                                         "faults (root): testbed up|down|status|check",
                         add_help=False)
    bed.add_argument("rest", nargs=argparse.REMAINDER)
    bed.set_defaults(func=cmd_testbed)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Log lines (the swarm's, the store client's) go to stderr: stdout is the command's.
    logs.configure(os.environ.get("DCDEPLOY_LOG_LEVEL", "warning"))
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "testbed":
        args.rest = [*unknown, *args.rest]  # its own options, e.g. --help, --base
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (CLIError, ops.OpError) as exc:
        print(f"dcdeploy: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"dcdeploy: store {store_url_from(args.store)}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
