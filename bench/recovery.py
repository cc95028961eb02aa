"""Recovery benchmark: a joiner's state download over an emulated WAN link, and how long a crash holds a run up.

    python bench/recovery.py [--state-mb 64] [--bandwidth-mbit 100] [--latency-ms 40] [--streams 1,4]
                             [--repeats 2] [--skip-crash] [--json PATH]

Transfer. A donor serves an S MiB global state (``PeerServicer``); a separate
process fetches it with ``fetch_state`` through the WAN emulator
(``dtrain.sim.wan``, the one ``dtrain-sim`` uses) over one link of B Mbit/s
and L ms one-way latency, with 1 and N parallel streams. The fraction of the
link's bandwidth is ``(S * 8 / B) / seconds``, where seconds covers the whole
download (connection set-up, header, chunks, hash check). Target: >= 0.80.

Crash. ``dtrain-sim`` with 3 model-free peers (the real coordinator, outer
collective and state transfer) SIGKILLs one peer mid-run. The stall is the
time from the kill to the next commit; the liveness invariant bounds it by
the lease timeout plus one retried round. Target: stall <= lease + 2 x the
median round time before the kill.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, positive_float, positive_int, target, write_json  # noqa: E402

SCHEMA = "b" * 64
FETCH = """
import sys, time
from dtrain.comm.state_download import fetch_state
t = time.perf_counter()
s = fetch_state(sys.argv[1], sys.argv[2], streams=int(sys.argv[3]), timeout=600, chunk_timeout=60)
print(time.perf_counter() - t, len(s.payload), flush=True)
"""


def streams_list(text: str):
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return out


def bench_transfer(a) -> list:
    from dtrain.comm.peer_service import PeerServicer, serve_peer
    from dtrain.sim.wan import LinkSpec, WanEmulator
    from dtrain.wire.snapshot import StateSnapshot

    payload = os.urandom(int(a.state_mb * 2**20))
    svc = PeerServicer(SCHEMA, "donor")
    svc.set_snapshot(StateSnapshot(1, payload))
    server, port = serve_peer(svc)
    wan = WanEmulator(lambda x, y: LinkSpec(a.latency_ms, 0.0, a.bandwidth_mbit) if x != y else LinkSpec(), seed=0)
    url = wan.add_node("joiner", "us")
    wan.add_node("donor", "eu")
    address = f"127.0.0.1:{port}"
    wan.register("donor", address)
    env = {**os.environ, "grpc_proxy": url}
    for k in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        env.pop(k, None)
    ideal = len(payload) * 8 / (a.bandwidth_mbit * 1e6)
    rows = []
    try:
        for n in a.streams:
            secs = []
            for _ in range(a.repeats):
                r = subprocess.run(
                    [sys.executable, "-c", FETCH, address, SCHEMA, str(n)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if r.returncode != 0:
                    raise SystemExit(f"fetch failed: {r.stderr.strip().splitlines()[-1:]}")
                secs.append(float(r.stdout.split()[0]))
            med = statistics.median(secs)
            rows.append(
                {
                    "part": "transfer",
                    "streams": n,
                    "state_mb": a.state_mb,
                    "link_mbit": a.bandwidth_mbit,
                    "latency_ms": a.latency_ms,
                    "seconds": med,
                    "ideal_s": ideal,
                    "mbit_per_s": len(payload) * 8 / med / 1e6,
                    "fraction_of_link": ideal / med,
                }
            )
    finally:
        wan.close()
        server.stop(0)
    return rows


def bench_crash(a) -> dict:
    lease = 3.0
    with tempfile.TemporaryDirectory() as d:
        run_dir = os.path.join(d, "sim")
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "dtrain-sim"),
            f"run_dir={run_dir}",
            "sim.peer=model_free",
            "sim.rounds=20",
            "sim.step_s=0.5",
            "sim.numel=1000000",
            "chaos.kill_at_s=[4]",
            "chaos.join_at_s=[]",
            f"wan.latency_ms={a.latency_ms}",
            f"wan.bandwidth_mbit={a.bandwidth_mbit}",
            f'sim.coordinator_args=["lease_timeout_s={lease}","heartbeat_interval_s=0.5","grace_s=0.5"]',
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"dtrain-sim failed:\n{r.stdout[-2000:]}")
        events = [json.loads(line) for line in open(os.path.join(run_dir, "events.jsonl"))]
        kill = next(e["time"] for e in events if e["event"] == "kill")
        commits = sorted(
            json.loads(line)["time"]
            for line in open(os.path.join(run_dir, "coordinator", "events.jsonl"))
            if '"commit"' in line
        )
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
    before = [b - x for x, b in zip(commits, commits[1:]) if b < kill]
    round_s = statistics.median(before) if before else float("nan")
    after = [c for c in commits if c > kill]
    stall = (after[0] - kill) if after else float("nan")
    return {
        "part": "crash",
        "lease_timeout_s": lease,
        "round_s": round_s,
        "stall_s": stall,
        "bound_s": lease + 2 * round_s,
        "parity": summary["parity"],
        "rounds_lost": summary["rounds_lost"],
        "retries": summary["retries"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mb", type=positive_float, default=64.0)
    p.add_argument("--bandwidth-mbit", type=positive_float, default=100.0)
    p.add_argument("--latency-ms", type=float, default=40.0)
    p.add_argument("--streams", type=streams_list, default=[1, 4])
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--skip-crash", action="store_true")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if a.latency_ms < 0:
        p.error(f"--latency-ms: expected a number >= 0, got {a.latency_ms}")
    rows = bench_transfer(a)
    print(
        format_table(
            ["streams", "state MiB", "link Mbit/s", "latency ms", "seconds", "ideal s", "Mbit/s", "fraction of link"],
            [
                [
                    r["streams"],
                    r["state_mb"],
                    r["link_mbit"],
                    r["latency_ms"],
                    r["seconds"],
                    r["ideal_s"],
                    r["mbit_per_s"],
                    r["fraction_of_link"],
                ]
                for r in rows
            ],
            "state transfer to a joiner over one emulated WAN link",
        )
    )
    best = max(r["fraction_of_link"] for r in rows)
    targets = [target("state transfer fraction of link bandwidth (best streams)", best, ">= 0.8")]
    if not a.skip_crash:
        c = bench_crash(a)
        rows.append(c)
        print()
        print(
            format_table(
                ["lease s", "round s", "stall after kill s", "bound s", "parity", "rounds lost"],
                [[c["lease_timeout_s"], c["round_s"], c["stall_s"], c["bound_s"], c["parity"], c["rounds_lost"]]],
                "a peer SIGKILLed mid-run (3 model-free peers)",
            )
        )
        targets.append(target("stall after a kill / (lease + 2 rounds)", c["stall_s"] / c["bound_s"], "<= 1.0"))
        targets.append(target("rounds lost", float(c["rounds_lost"]), "<= 0"))
    print()
    for t in targets:
        print(f"target {t['name']}: {t['value']:.3f} (want {t['target']}) {'met' if t['met'] else 'MISSED'}")
    if a.json:
        write_json(a.json, rows, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
