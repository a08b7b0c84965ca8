#!/usr/bin/env python3
"""Which pieces do libtorrent hosts fetch from the origin? A loopback experiment (issue #12
item 4; docs/distribution.md, "libtorrent tuning"), no namespaces and no root needed.

One seed session on 127.0.0.1 whose "local" peer class (loopback and private addresses)
gets an upload limit (``--seed-rate``; the session's own limit does not apply to that
class), and N leecher sessions on 127.0.0.2.. connected to the seed and to each other, all
with ltdaemon's settings plus ``--tuning`` for the leechers, in one process. With
``--share interleave`` leecher k gives the pieces p with p % N == k priority 7
(``contiguous``: the k-th N-th of the torrent), as ``ltdaemon --share-pieces`` does.

Every block a leecher receives is attributed to the peer that sent it
(block_finished_alert), so the share of the blocks from the seed that were the leecher's own
("own_frac", chance = 1/N) is exact; the per-peer ``downloading_piece_index`` that the
benchmark's timeline records is also sampled twice a second ("sampled_own_frac") to check
that measurement against the exact one, and the seed peer's request queue
(``download_queue_length``, requests sent and not yet sent) is sampled too.

    .venv/bin/python bench/ltpicks.py --leechers 4 --share interleave \
        --tuning '{"whole_pieces_threshold": 0}' --json

CPU-light (a second or two of CPU for a 32 MiB run); the run takes as long as the seed's
rate needs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import libtorrent as lt

from supervisor_dcdeploy.p2p.ltdaemon import settings
from supervisor_dcdeploy.p2p.torrent import make_torrent

PIECE = 64 * 1024


def share_of(k: int, n: int, num_pieces: int, layout: str) -> set[int]:
    if layout == "interleave":
        return {p for p in range(num_pieces) if p % n == k}
    per = -(-num_pieces // n)
    return set(range(k * per, min(num_pieces, (k + 1) * per)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leechers", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--seed-rate", type=int, default=1_200_000,
                    help="bytes/s: the seed's upload limit")
    ap.add_argument("--share", choices=["none", "interleave", "contiguous"], default="none")
    ap.add_argument("--prio-when", choices=["before", "after"], default="before",
                    help="set priorities before connecting peers, or 2 s after")
    ap.add_argument("--tuning", default="{}", help="JSON settings for the leechers")
    ap.add_argument("--port", type=int, default=46000)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tuning = json.loads(args.tuning)
    n = args.leechers
    mask = 0x1 | lt.alert.category_t.block_progress_notification | 0x40

    work = Path(tempfile.mkdtemp(prefix="pickexp-"))
    src = work / "seed"
    src.mkdir()
    art = src / "artifact.bin"
    with open(art, "wb") as f:
        f.write(random.randbytes(args.size_mib * 1024 * 1024))
    meta, ih = make_torrent(art, piece_size=PIECE)
    ti = lt.torrent_info(lt.bdecode(meta))
    num_pieces = ti.num_pieces()

    def session(addr: str, port: int, extra: dict) -> lt.session:
        s = settings(addr, port, extra)
        s["alert_mask"] = mask
        s["outgoing_interfaces"] = addr  # else every outgoing connection comes from 127.0.0.1
        return lt.session(s)

    def add(ses: lt.session, path: Path) -> lt.torrent_handle:
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(lt.bdecode(meta))
        atp.save_path = str(path)
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        return ses.add_torrent(atp)

    seed_ses = session("127.0.0.1", args.port, {})
    seed = add(seed_ses, src)
    while not seed.status().is_seeding:
        time.sleep(0.1)
    # loopback peers are in libtorrent's "local" peer class, which has no rate limit and is
    # not the global class the session's upload_rate_limit applies to: limit that class.
    seed_ses.set_peer_class(seed_ses.local_peer_class_id, {"upload_limit": args.seed_rate,
                                                          "label": "local"})

    addrs = [f"127.0.0.{k + 2}" for k in range(n)]
    sess, hs, shares = [], [], []
    for k, a in enumerate(addrs):
        d = work / f"l{k}"
        d.mkdir()
        s = session(a, args.port, tuning)
        sess.append(s)
        hs.append(add(s, d))
        shares.append(share_of(k, n, num_pieces, args.share) if args.share != "none"
                      else share_of(k, n, num_pieces, "contiguous"))  # only to count

    def apply_share() -> None:
        if args.share == "none":
            return
        for h, sh in zip(hs, shares):
            h.prioritize_pieces([7 if p in sh else 4 for p in range(num_pieces)])

    if args.prio_when == "before":
        apply_share()
    t0 = time.monotonic()
    for k, h in enumerate(hs):
        h.connect_peer(("127.0.0.1", args.port))
        for j in range(k):
            h.connect_peer((addrs[j], args.port))
    applied = args.prio_when == "before"

    from_seed = [[] for _ in range(n)]   # pieces of blocks received from the seed, in order
    from_peers = [0] * n
    sampled = [[] for _ in range(n)]     # downloading_piece_index of the seed peer, sampled
    queues = [[] for _ in range(n)]      # download_queue_length of the seed peer, sampled
    done_at = [None] * n
    next_sample = 0.0
    while time.monotonic() - t0 < args.timeout and None in done_at:
        now = time.monotonic() - t0
        if not applied and now >= 2.0:
            apply_share()
            applied = True
        for k, s in enumerate(sess):
            for a in s.pop_alerts():
                if isinstance(a, lt.block_finished_alert):
                    if a.endpoint[0] == "127.0.0.1":
                        from_seed[k].append((now, a.piece_index))
                    else:
                        from_peers[k] += 1
                elif isinstance(a, lt.torrent_finished_alert) and done_at[k] is None:
                    done_at[k] = now
        if now >= next_sample:
            next_sample = now + 0.5
            for k, h in enumerate(hs):
                for p in h.get_peer_info():
                    if p.ip[0] == "127.0.0.1":
                        queues[k].append(p.download_queue_length)
                        if p.downloading_piece_index >= 0:
                            sampled[k].append(p.downloading_piece_index)
        seed_ses.pop_alerts()
        time.sleep(0.02)
    up = seed.status().total_payload_upload
    size = ti.total_size()
    out = {"leechers": n, "pieces": num_pieces, "share": args.share, "prio_when": args.prio_when,
"tuning": tuning, "seed_rate": args.seed_rate,
           "last_done_s": round(max(d or args.timeout for d in done_at), 1),
           "seed_egress_over_size": round(up / size, 3), "per_leecher": []}
    for k in range(n):
        blocks = [p for _, p in from_seed[k]]
        own = sum(1 for p in blocks if p in shares[k])
        # the first half of the run (by seed blocks): before the share could be exhausted
        half = blocks[: len(blocks) // 2]
        own_half = sum(1 for p in half if p in shares[k])
        smp = sampled[k]
        out["per_leecher"].append({
            "addr": addrs[k], "done_s": done_at[k] and round(done_at[k], 1),
            "blocks_from_seed": len(blocks), "blocks_from_peers": from_peers[k],
            "own_frac": round(own / max(1, len(blocks)), 3),
            "own_frac_first_half": round(own_half / max(1, len(half)), 3),
            "queue_max": max(queues[k] or [0]),
            "queue_mean": round(sum(queues[k]) / max(1, len(queues[k])), 1),
            "sampled_n": len(smp),
            "sampled_own_frac": round(sum(1 for p in smp if p in shares[k]) / max(1, len(smp)),
                                      3)})
    out["chance"] = round(1 / n, 3)
    print(json.dumps(out, indent=None if args.json else 1))
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
