"""Benchmark: throughput of the outer collectives, ``grpc`` vs ``gloo``, k peers on loopback.

k worker processes (``--peers``, default 4; spawned, one per member) each run
the collectives directly, the way a peer's RoundEngine calls them:
``GrpcCollective`` (fp32 codec, over its own ``PeerServicer`` + ``serve_peer``
+ ``ShardInbox``) and ``GlooCollective`` (fp32 codec: gloo's ring allreduce,
over a ``TCPStore`` held by the bench process). No coordinator: the group
(quorum 1, a new round per call, one op per backend and size, so gloo builds
its process group once per size, in the warm-up) is fixed by the bench.

What is timed: one ``allreduce_mean(x, group, deadline)`` call of every member
on x = N float32 values (``--sizes`` in MiB of tensor: 1, 16, 64). All members
wait on a barrier, then call; the time of a call is the latest member's
return minus the earliest member's entry (CLOCK_MONOTONIC is shared by the
processes). Everything inside the call counts: encoding, the transfer, the
decoding and checks, the sum, the mean; nothing outside it (no tensor
allocation, no rendezvous after the warm-up). Throughput = tensor MiB / time
(the same N for both backends; grpc moves ~2(k-1)/k * 4N bytes per member,
gloo's ring the same). Every round runs every (size, backend) once,
interleaved, the backend order alternating from round to round; after
``--warmup`` untimed rounds, the median of ``--repeats`` timed rounds. CPU =
user + system seconds of all member processes during the call, per MiB.
Every member's result is checked against the exact mean (inputs chosen so
that the fp32 mean is exact).

Target: grpc_vs_gloo_64MiB = grpc MiB/s / gloo MiB/s at 64 MiB >= 0.9.

WAN part: the grpc collective again, every member behind its own uplink of
``--wan-mbit`` in the WAN emulator of ``dtrain-sim`` (``dtrain.sim.wan``, one
egress proxy per member, ``--wan-latency-ms`` one way on every link), on a
``--wan-size`` MiB tensor. ring_bound_fraction_wan = (2(k-1)/k * N / B) /
median time, target >= 0.85. A missed target is reported (``met: false``);
the exit status stays 0.

    python bench/allreduce.py [--peers 4] [--sizes 1,16,64] [--repeats 5] [--warmup 1]
                              [--backends grpc,gloo] [--chunk-bytes B] [--streams S]
                              [--timeout 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    format_table,
    member_count,
    positive_float,
    positive_int,
    ratio,
    summary,
    target,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e``
    sys.path.insert(1, str(ROOT))

BACKENDS = ("grpc", "gloo")
MIB = 1 << 20
QUORUM = 1


# --------------------------------------------------------------------------- arguments


def _sizes(text: str) -> List[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes in MiB > 0, got {text!r}") from None
    if not vals or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes in MiB > 0, got {text!r}")
    if any(int(v * MIB) // 4 < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"every size must hold at least one float32 value, got {text!r}")
    return list(dict.fromkeys(vals))


def _backends(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in BACKENDS for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated backends from {', '.join(BACKENDS)}, got {text!r}")
    return list(dict.fromkeys(names))


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peers", type=member_count, default=4, help="members k, one process each (4)")
    p.add_argument("--sizes", type=_sizes, default=[1.0, 16.0, 64.0], help="tensor sizes in MiB of fp32 (1,16,64)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (5)")
    p.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=1,
        help="untimed rounds first (1; they also build gloo's process groups)",
    )
    p.add_argument("--backends", type=_backends, default=list(BACKENDS), help="collectives (grpc,gloo)")
    p.add_argument(
        "--chunk-bytes", type=positive_int, default=None, help="grpc chunk size (GrpcCollective's default, 1 MiB)"
    )
    p.add_argument(
        "--streams", type=positive_int, default=None, help="grpc streams per destination (GrpcCollective's default, 2)"
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="give up after this many seconds in all (600); also every call's deadline",
    )
    p.add_argument(
        "--wan-mbit", type=positive_float, default=100.0, help="WAN part: every member's uplink in Mbit/s (100)"
    )
    p.add_argument("--wan-latency-ms", type=float, default=20.0, help="WAN part: one-way latency (20)")
    p.add_argument("--wan-size", type=positive_float, default=8.0, help="WAN part: tensor MiB (8)")
    p.add_argument("--wan-repeats", type=positive_int, default=3, help="WAN part: timed rounds (3)")
    p.add_argument("--no-wan", action="store_true", help="skip the WAN part")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from dtrain.comm.grpc_allreduce import MAX_STREAMS
    from dtrain.wire.snapshot import MAX_CHUNK_BYTES

    if args.chunk_bytes is not None and args.chunk_bytes > MAX_CHUNK_BYTES:
        p.error(f"argument --chunk-bytes: at most {MAX_CHUNK_BYTES}, got {args.chunk_bytes}")
    if args.streams is not None and args.streams > MAX_STREAMS:
        p.error(f"argument --streams: at most {MAX_STREAMS}, got {args.streams}")
    if args.wan_latency_ms < 0:
        p.error(f"argument --wan-latency-ms: expected a number >= 0, got {args.wan_latency_ms}")
    if args.json:
        parent = Path(args.json).resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"argument --json: cannot create directory {parent}: {e.strerror}")
        if not os.access(parent, os.W_OK):
            p.error(f"argument --json: directory {parent} is not writable")


# --------------------------------------------------------------------------- the plan and the inputs


def numel_of(size_mib: float) -> int:
    return int(size_mib * MIB) // 4


def make_plan(sizes: List[float], backends: List[str], rounds: int) -> List[Tuple[int, float, str]]:
    """(round, size, backend) calls in order: every round runs every size with every backend,
    the backend order alternating from round to round."""
    plan = []
    for r in range(rounds):
        order = backends if r % 2 == 0 else list(reversed(backends))
        for size in sizes:
            for b in order:
                plan.append((r, size, b))
    return plan


def member_input(rank: int, n: int):
    """Member ``rank``'s tensor: (rank + 1) * pattern / 8 with pattern = small integers, so the float32
    sum over members and the mean are exact: mean = pattern * (k + 1) / 16."""
    import torch

    pattern = (torch.arange(n, dtype=torch.int64) % 2047 - 1023).to(torch.float32)
    return pattern * ((rank + 1) / 8.0), pattern


# --------------------------------------------------------------------------- members (worker processes)


def worker_main(
    rank: int,
    k: int,
    sizes: List[float],
    plan,
    store_port: int,
    barrier,
    inq,
    outq,
    chunk_bytes,
    streams,
    deadline_s: float,
    proxy: str = "",
) -> None:
    server = None
    if proxy:  # the WAN part: this member's gRPC channels go through its egress proxy in the emulator
        os.environ["grpc_proxy"] = proxy
        for key in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
            os.environ.pop(key, None)
    try:
        import torch

        torch.set_num_threads(1)
        from dtrain.comm.collective import Group
        from dtrain.comm.gloo_allreduce import GlooCollective
        from dtrain.comm.grpc_allreduce import GrpcCollective
        from dtrain.comm.peer_service import PeerServicer, serve_peer
        from dtrain.comm.shard_inbox import ShardInbox
        from dtrain.outer.codecs import get_codec

        me = f"peer-{rank}"
        inbox = ShardInbox()
        server, port = serve_peer(PeerServicer("bench-allreduce", me, inbox=inbox), "127.0.0.1", 0)
        outq.put(("ready", rank, port))
        members = inq.get(timeout=deadline_s)
        kw = {}
        if chunk_bytes is not None:
            kw["chunk_bytes"] = chunk_bytes
        if streams is not None:
            kw["streams"] = streams
        colls = {
            "grpc": GrpcCollective(get_codec("fp32"), me, inbox=inbox, **kw),
            "gloo": GlooCollective(get_codec("fp32")),
        }
        inputs, expected = {}, {}
        for size in sizes:
            x, pattern = member_input(rank, numel_of(size))
            inputs[size] = x
            expected[size] = pattern.mul_((k + 1) / 16.0)
        store = f"127.0.0.1:{store_port}"
        timings, bad = [], []
        for i, (_, size, backend) in enumerate(plan):
            barrier.wait(deadline_s)
            group = Group(
                quorum_id=QUORUM, round=i, members=members, me=me, op=f"{backend}-{size:g}", store_address=store
            )
            c0, t0 = time.process_time(), time.monotonic()
            res = colls[backend].allreduce_mean(inputs[size], group, deadline_s)
            t1, c1 = time.monotonic(), time.process_time()
            timings.append((i, t0, t1, c1 - c0, res.bytes_sent, res.bytes_recv))
            barrier.wait(deadline_s)  # check only once every member is out of the call: no CPU taken from it
            if not torch.equal(res.tensor, expected[size]):
                err = float((res.tensor - expected[size]).abs().max())
                bad.append(f"call {i} ({backend}, {size:g} MiB): max |error| {err:g}")
        outq.put(("done", rank, {"timings": timings, "bad": bad}))
        barrier.wait(deadline_s)  # nobody stops serving while another still waits for its pushes' acks
        for c in colls.values():
            c.close()
    except Exception:
        outq.put(("error", rank, traceback.format_exc()))
    finally:
        if server is not None:
            server.stop(0)


def _collect(outq, want, kind: str, deadline: float, procs) -> Dict[int, object]:
    got = {}
    while len(got) < len(want):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no {kind!r} from member(s) {sorted(set(want) - set(got))} in time")
        try:
            tag, rank, payload = outq.get(timeout=min(left, 1.0))
        except queue.Empty:
            dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"member process(es) {dead} died") from None
            continue
        if tag == "error":
            raise RuntimeError(f"member {rank} failed: {payload.strip().splitlines()[-1]}\n{payload}")
        if tag == kind:
            got[rank] = payload
    return got


def run_members(args, plan, sizes=None, wan=None) -> Dict[int, dict]:
    """Run the members; with ``wan`` (a WanEmulator) each member's traffic goes through its own node."""
    import torch.distributed as dist

    k = args.peers
    sizes = args.sizes if sizes is None else sizes
    proxies = [wan.add_node(f"peer-{r}", f"r{r}", uplink_mbit=args.wan_mbit) if wan else "" for r in range(k)]
    ctx = mp.get_context("spawn")  # gRPC and fork do not mix
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    barrier = ctx.Barrier(k)
    outq = ctx.Queue()
    inqs = [ctx.Queue() for _ in range(k)]
    procs = []
    deadline = time.monotonic() + args.timeout
    try:
        for rank in range(k):
            p = ctx.Process(
                target=worker_main,
                name=f"bench-allreduce-{rank}",
                args=(
                    rank,
                    k,
                    sizes,
                    plan,
                    store.port,
                    barrier,
                    inqs[rank],
                    outq,
                    args.chunk_bytes,
                    args.streams,
                    args.timeout,
                    proxies[rank],
                ),
                daemon=True,
            )
            p.start()
            procs.append(p)
        ports = _collect(outq, range(k), "ready", deadline, procs)
        members = tuple((f"peer-{r}", f"127.0.0.1:{ports[r]}") for r in range(k))
        if wan is not None:
            for name, address in members:
                wan.register(name, address)
        for q in inqs:
            q.put(members)
        return _collect(outq, range(k), "done", deadline, procs)
    finally:
        for p in procs:
            p.join(max(1.0, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5.0)
        outq.close()
        for q in inqs:
            q.close()
        del store


# --------------------------------------------------------------------------- results


def analyse(done: Dict[int, dict], plan, args) -> Tuple[List[dict], List[str]]:
    k = args.peers
    problems = [b for d in done.values() for b in d["bad"]]
    calls: Dict[int, list] = {}
    for d in done.values():
        for i, t0, t1, cpu, sent, recv in d["timings"]:
            calls.setdefault(i, []).append((t0, t1, cpu, sent, recv))
    per: Dict[Tuple[float, str], Dict[str, list]] = {}
    for i, (r, size, backend) in enumerate(plan):
        if r < args.warmup:
            continue
        recs = calls.get(i, [])
        if len(recs) != k:
            problems.append(f"call {i}: {len(recs)} of {k} members reported")
            continue
        span = max(x[1] for x in recs) - min(x[0] for x in recs)
        d = per.setdefault((size, backend), {"span": [], "slowest": [], "cpu": [], "sent": []})
        d["span"].append(span)
        d["slowest"].append(max(x[1] - x[0] for x in recs))
        d["cpu"].append(sum(x[2] for x in recs))
        d["sent"].append(statistics.fmean(x[3] for x in recs))
    rows = []
    for size in args.sizes:
        for backend in args.backends:
            d = per.get((size, backend))
            if d is None:
                continue
            n = numel_of(size)
            mib = 4 * n / MIB
            s = summary(d["span"])
            rows.append(
                {
                    "size_mib": size,
                    "numel": n,
                    "backend": backend,
                    "repeats": s["n"],
                    "median_s": s["median_s"],
                    "min_s": s["min_s"],
                    "max_s": s["max_s"],
                    "mib_per_s": mib / s["median_s"],
                    "best_mib_per_s": mib / s["min_s"],
                    "slowest_member_median_s": statistics.median(d["slowest"]),
                    "cpu_s_per_mib": statistics.median(d["cpu"]) / mib,
                    "wire_mib_per_member": statistics.median(d["sent"]) / MIB,
                    "times_s": [round(v, 6) for v in d["span"]],
                }
            )
    for row in rows:
        other = next((r for r in rows if r["size_mib"] == row["size_mib"] and r["backend"] == "gloo"), None)
        row["vs_gloo"] = ratio(row["mib_per_s"], other["mib_per_s"]) if other else float("nan")
    return rows, problems


def run_wan(args) -> Tuple[float, dict]:
    """The grpc collective with every member behind an emulated uplink: fraction of the ring bound."""
    from dtrain.sim.wan import LinkSpec, WanEmulator

    wan = WanEmulator(lambda a, b: LinkSpec(args.wan_latency_ms, 0.0, 0.0) if a != b else LinkSpec(), seed=0)
    plan = make_plan([args.wan_size], ["grpc"], 1 + args.wan_repeats)
    try:
        done = run_members(args, plan, sizes=[args.wan_size], wan=wan)
    finally:
        wan.close()
    sub = argparse.Namespace(**{**vars(args), "sizes": [args.wan_size], "backends": ["grpc"], "warmup": 1})
    rows, problems = analyse(done, plan, sub)
    row = dict(rows[0], part="wan", uplink_mbit=args.wan_mbit, latency_ms=args.wan_latency_ms)
    k, n_bytes = args.peers, 4 * numel_of(args.wan_size)
    row["ring_bound_s"] = 2 * (k - 1) / k * n_bytes * 8 / (args.wan_mbit * 1e6)
    row["problems"] = problems
    return ratio(row["ring_bound_s"], row["median_s"]), row


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    import grpc
    import torch

    notes: List[str] = []
    plan = make_plan(args.sizes, args.backends, args.warmup + args.repeats)
    print(
        f"allreduce: k={args.peers} member processes on loopback, sizes {[f'{s:g}' for s in args.sizes]} MiB "
        f"fp32, backends {','.join(args.backends)}, {args.repeats} timed round(s) (+{args.warmup} warm-up), "
        f"grpcio {grpc.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )
    t0 = time.monotonic()
    try:
        done = run_members(args, plan)
    except RuntimeError as e:
        print(f"allreduce: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"  {len(plan)} calls per member in {time.monotonic() - t0:.1f}s", flush=True)
    rows, problems = analyse(done, plan, args)
    for pr in problems[:5]:
        notes.append(f"WRONG RESULT / missing data: {pr}")
    if len(problems) > 5:
        notes.append(f"... and {len(problems) - 5} more problems")

    print()
    print(
        format_table(
            [
                "MiB",
                "backend",
                "n",
                "median s",
                "min s",
                "max s",
                "MiB/s",
                "best MiB/s",
                "vs gloo",
                "CPU s/MiB",
                "wire MiB",
            ],
            [
                [
                    r["size_mib"],
                    r["backend"],
                    r["repeats"],
                    r["median_s"],
                    r["min_s"],
                    r["max_s"],
                    r["mib_per_s"],
                    r["best_mib_per_s"],
                    r["vs_gloo"],
                    r["cpu_s_per_mib"],
                    r["wire_mib_per_member"],
                ]
                for r in rows
            ],
            title=f"allreduce_mean of an fp32 tensor, {args.peers} members: first entry -> last return "
            f"(MiB/s = tensor MiB / median time)",
        )
    )

    nan = float("nan")
    wan_fraction = nan
    if not args.no_wan and "grpc" in args.backends:
        wan_fraction, wan_row = run_wan(args)
        rows.append(wan_row)
        print()
        print(
            format_table(
                ["MiB", "members", "uplink Mbit/s", "latency ms", "median s", "ring bound s", "fraction of ring bound"],
                [
                    [
                        wan_row["size_mib"],
                        args.peers,
                        args.wan_mbit,
                        args.wan_latency_ms,
                        wan_row["median_s"],
                        wan_row["ring_bound_s"],
                        wan_fraction,
                    ]
                ],
                title="grpc allreduce_mean over the WAN emulator (each member behind its own uplink)",
            )
        )
    at64 = {r["backend"]: r for r in rows if r["size_mib"] == 64.0}
    if "grpc" in at64 and "gloo" in at64:
        value = ratio(at64["grpc"]["mib_per_s"], at64["gloo"]["mib_per_s"])
    else:
        value = nan
        notes.append("grpc_vs_gloo_64MiB needs both backends at 64 MiB (--sizes, --backends): n/a (not met)")
    targets = [
        target("grpc_vs_gloo_64MiB", value, ">= 0.9"),
        target("ring_bound_fraction_wan", wan_fraction, ">= 0.85"),
    ]
    print()
    print(
        format_table(
            ["target", "value", "wanted", "met"], [[t["name"], t["value"], t["target"], t["met"]] for t in targets]
        )
    )
    notes.append(
        "ring_bound_fraction_wan = 2(k-1)/k * N bytes / uplink bandwidth, over the median time of a grpc "
        "allreduce_mean with every member behind its own uplink in the WAN emulator (dtrain.sim.wan; one-way "
        "latency --wan-latency-ms on every link)"
        if not args.no_wan
        else "ring_bound_fraction_wan: skipped (--no-wan): n/a (NaN, not met)"
    )
    notes.append(
        "time = latest member's return - earliest member's entry of one allreduce_mean call (members "
        "start together after a barrier); MiB/s counts the tensor, not the wire: each member moves "
        "about 2(k-1)/k of it each way (wire MiB = grpc's counted bytes sent per member; gloo: its "
        "algorithm's)"
    )
    notes.append(
        f"CPU s/MiB = user+system seconds of all {args.peers} member processes during the call, per "
        f"tensor MiB; the members share {os.cpu_count()} CPUs, so loopback throughput is CPU-bound"
    )
    notes.append(
        "every member's result was compared with the exact mean"
        + (": all equal" if not problems else ": see the problems above")
    )
    for nt in notes:
        print("note:", nt)
    missed = [t["name"] for t in targets if not t["met"]]
    print("targets missed: " + ", ".join(missed) if missed else "all targets met")
    if args.json:
        write_json(
            args.json,
            rows,
            targets,
            notes=notes,
            settings={
                "peers": args.peers,
                "sizes_mib": args.sizes,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "backends": args.backends,
                "chunk_bytes": args.chunk_bytes,
                "streams": args.streams,
                "grpcio": grpc.__version__,
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
