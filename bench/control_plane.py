"""Benchmark: the coordinator's control plane under N simulated peers on loopback.

For every peer count N (``--peers 8,32,128``) the bench starts a fresh
coordinator subprocess (``python -m dtrain.cli.coordinator``, own state dir,
``min_peers=1`` and a grace window far longer than a round, so that every
quorum waits for all N live peers) and N ``CoordinatorClient``s, each with its
heartbeat thread and one thread that drives its rounds. The regular peers are
spread over worker processes (``--workers``, default one per 32 peers) so
that one client process's GIL does not serialise all replies; the peer that
is killed in (3) runs alone in its own process. No peer computes anything:
a round is Sync(r) then Commit(r, ok=True). Measured:

  (1) rounds/s: ``--rounds`` R rounds after ``--warmup`` untimed ones;
      R / (earliest Sync start of the first timed round -> latest COMMIT
      reply of the last one).
  (2) quorum latency: per round, the peer whose Sync call started last;
      that call's start -> its QUORUM reply (p50 / p99 over the R rounds).
      From ``events.jsonl``: that Sync's start -> the ``quorum`` event's
      logged time (formation: transit + the coordinator's work, which
      includes persisting state.json) and event -> reply (delivery).
      Wall-clock event times have 1 ms resolution.
  (3) death detection: after the timed rounds the peers keep going; one
      peer SIGKILLs its own process right after a successful call
      reply. Delay = the ``expire`` event's time - the end of that call
      (later if another call of that peer had started since);
      ratio = delay / ``--lease-timeout``.
  (4) the gRPC floor (``_grpc_floor.py``, skip with ``--no-floor``): the
      same rounds, peers and processes against a bare grpc.aio server that
      only holds each call until all N peers called; its last-Sync latency,
      side by side with the coordinator's.

Targets at 128 peers: p99_quorum_latency_ms_128 < 50, death_detection_ratio_128
<= 1.10. A missed target is reported (``met: false``); the exit status stays 0.

    python bench/control_plane.py [--peers 8,32,128] [--rounds 40] [--warmup 3]
                                  [--lease-timeout 2.0] [--heartbeat-interval S]
                                  [--workers auto|K] [--no-floor] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _grpc_floor  # noqa: E402
from _common import format_table, positive_float, positive_int, target, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e``
    sys.path.insert(1, str(ROOT))

SCHEMA = "bench-control-plane"
PEERS_PER_WORKER = 32
VICTIM = "peer-000"


# --------------------------------------------------------------------------- arguments


def _peer_list(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 2, got {text!r}") from None
    if not vals or any(v < 2 for v in vals):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 2 (one peer of each count is killed), got {text!r}"
        )
    return vals


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _workers(text: str):
    return "auto" if text == "auto" else positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peers", type=_peer_list, default=[8, 32, 128], help="peer counts (8,32,128)")
    p.add_argument("--rounds", type=positive_int, default=40, help="timed rounds per peer count (40)")
    p.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed rounds first (3)")
    p.add_argument("--lease-timeout", type=positive_float, default=2.0, help="the coordinator's lease_timeout_s (2.0)")
    p.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        default=None,
        help="heartbeat_interval_s (default: lease timeout / 5, the ratio of conf/coordinator.yaml)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help=f"processes for the regular peers (auto: one per {PEERS_PER_WORKER} peers); "
        "the killed peer always runs in its own",
    )
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the gRPC floor (the same rounds against a server that does nothing)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.heartbeat_interval is None:
        args.heartbeat_interval = args.lease_timeout / 5
    if args.heartbeat_interval >= args.lease_timeout:
        p.error(
            f"argument --heartbeat-interval: {args.heartbeat_interval:g}s must be shorter than "
            f"--lease-timeout {args.lease_timeout:g}s"
        )
    if args.json:
        parent = Path(args.json).resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"argument --json: cannot create directory {parent}: {e.strerror}")
        if not os.access(parent, os.W_OK):
            p.error(f"argument --json: directory {parent} is not writable")


# --------------------------------------------------------------------------- coordinator


def coordinator_command(state_dir: str, lease: float, heartbeat: float) -> List[str]:
    return [
        sys.executable,
        "-m",
        "dtrain.cli.coordinator",
        f"state_dir={state_dir}",
        "port=0",
        "min_peers=1",
        f"lease_timeout_s={lease:g}",
        f"heartbeat_interval_s={heartbeat:g}",
        "grace_s=300",
        "commit_timeout_s=300",
    ]


def start_coordinator(state_dir: str, lease: float, heartbeat: float, timeout: float = 60.0):
    """The coordinator subprocess and its ``host:port``; stdout/stderr go to files in ``state_dir``
    (a pipe nobody reads would stall its logging)."""
    out_path, err_path = os.path.join(state_dir, "coordinator.out"), os.path.join(state_dir, "coordinator.err")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("DTRAIN_TOKEN", None)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            coordinator_command(state_dir, lease, heartbeat),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=state_dir,
            env=env,
        )
    deadline = time.monotonic() + timeout
    prefix = "coordinator listening on "
    while True:
        with open(out_path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if first.endswith("\n"):
            if first.startswith(prefix):
                return proc, first[len(prefix) :].strip()
            stop_process(proc)
            raise RuntimeError(f"coordinator printed {first.strip()!r} instead of its address")
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            with open(err_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"coordinator did not start (exit status {proc.returncode}): {tail}")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s; by PID only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class EventLog:
    """Incremental reader of the coordinator's ``events.jsonl``."""

    def __init__(self, path: str):
        self.path, self.offset, self.events = path, 0, []

    def read(self) -> List[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.events
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        for line in data[:end].splitlines():
            if line.strip():
                self.events.append(json.loads(line))
        self.offset += end
        return self.events


# --------------------------------------------------------------------------- peers (worker processes)


def state_hash(r: int) -> str:
    return hashlib.sha256(f"bench-state-{r}".encode()).hexdigest()


def _make_client_class():
    from dtrain.control.client import CoordinatorClient

    class WatchedClient(CoordinatorClient):
        """The peer that dies: notes every call's start and its last successful call in shared
        memory, and SIGKILLs its own process right after a call succeeds once ``die`` is set."""

        def __init__(self, *a, die=None, shared=None, **kw):
            super().__init__(*a, **kw)
            self._die, self._shared, self._note = die, shared, threading.Lock()

        def _rpc(self, method, request, timeout=None):
            with self._note:
                start = time.time()
                self._shared[2] = max(self._shared[2], start)  # latest call start (may renew the lease)
            reply = super()._rpc(method, request, timeout)
            with self._note:  # no other call's note lands between this one and the kill
                self._shared[0], self._shared[1] = start, time.time()
                if self._die.is_set():
                    os.kill(os.getpid(), signal.SIGKILL)
            return reply

    return CoordinatorClient, WatchedClient


def _drive(client, total_a: int, records: list, a_done, stop: threading.Event, errors: list, counters: dict):
    """One peer's rounds: Sync(r), Commit(r, ok), forever until ``stop``; rounds < total_a are recorded."""
    from dtrain.control.client import HealOrder
    from dtrain.wire.outcomes import CommitDecision

    r, reported = 0, False
    try:
        while not stop.is_set():
            if r >= total_a and not reported:
                reported = True
                a_done()
            t0m, t0w = time.monotonic(), time.time()
            ans = client.sync(r, state_hash(r), timeout=300)
            t1m, t1w = time.monotonic(), time.time()
            if isinstance(ans, HealOrder):
                raise RuntimeError(f"{client.peer_id}: told to heal at round {r}: {ans.reason}")
            ok = client.commit(r, ans.quorum_id, True, timeout=300) is CommitDecision.COMMIT
            t2m = time.monotonic()
            if r < total_a:
                records.append((client.peer_id, r, t0m, t0w, t1m, t1w, t2m, ans.quorum_id, len(ans.members), ok))
            if ok:
                r += 1
            else:
                counters["retries"] = counters.get("retries", 0) + 1
    except Exception:
        if not stop.is_set():
            errors.append(traceback.format_exc())
    finally:
        if not reported:
            a_done()


def worker_main(
    wid: int, target_addr: str, peer_ids: List[str], total_a: int, results, go, stop, die=None, shared=None
) -> None:
    """A worker process: join its peers, heartbeat, drive their rounds, report records."""
    try:
        Client, Watched = _make_client_class()
        clients = []
        for pid in peer_ids:
            kw = dict(
                target=target_addr,
                peer_id=pid,
                address=f"127.0.0.1:{20000 + int(pid.split('-')[1])}",
                schema_hash=SCHEMA,
                rpc_timeout=30.0,
            )
            c = Watched(**kw, die=die, shared=shared) if die is not None else Client(**kw)
            c.join(timeout=60)
            c.start_heartbeat()
            clients.append(c)
        results.put(("ready", wid, None))
        # Shared events are polled, never waited on: a process killed while waiting on a
        # multiprocessing Event would leave the Event's set() blocked forever.
        while not go.is_set():
            if stop.is_set():
                return
            time.sleep(0.02)
        records, errors, counters = [], [], {}
        local_stop = threading.Event()
        left, lock, all_a = [len(clients)], threading.Lock(), threading.Event()

        def a_done():
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    all_a.set()

        threads = [
            threading.Thread(
                target=_drive,
                args=(c, total_a, records, a_done, local_stop, errors, counters),
                name=f"rounds-{c.peer_id}",
                daemon=True,
            )
            for c in clients
        ]
        for t in threads:
            t.start()
        while not all_a.wait(0.1):
            if stop.is_set():
                break
        results.put(("a_done", wid, {"records": list(records), "errors": list(errors)}))
        while not stop.is_set():
            time.sleep(0.05)
        local_stop.set()
        for c in clients:
            c.close()  # in-flight calls fail; the rounds threads see local_stop and end
        for t in threads:
            t.join(5.0)
        results.put(("done", wid, {"errors": errors, "retries": counters.get("retries", 0)}))
    except Exception:
        results.put(("error", wid, traceback.format_exc()))


# --------------------------------------------------------------------------- measurement


def percentile(vals: List[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), NaN when empty."""
    if not vals:
        return float("nan")
    s = sorted(vals)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def split_workers(n_regular: int, workers) -> int:
    if n_regular == 0:
        return 0
    k = math.ceil(n_regular / PEERS_PER_WORKER) if workers == "auto" else workers
    return max(1, min(k, n_regular))


def peer_ids(n: int) -> List[str]:
    return [f"peer-{i:03d}" for i in range(n)]


def _groups(ids: List[str], workers) -> List[List[str]]:
    """The regular peers (all but the victim, ``ids[0]``) split over the worker processes."""
    regular = ids[1:]
    k = split_workers(len(regular), workers)
    return [regular[i::k] for i in range(k)]


class PhaseError(RuntimeError):
    pass


def _collect(results, want: Dict[int, str], deadline: float, kind: str) -> Dict[int, object]:
    got = {}
    while len(got) < len(want):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(want) - set(got))
            raise PhaseError(f"no {kind!r} from worker(s) {missing} in time")
        try:
            tag, wid, payload = results.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if tag == "error":
            raise PhaseError(f"worker {wid} failed:\n{payload}")
        if tag == kind and wid in want:
            got[wid] = payload
    return got


def run_one(n: int, args, notes: List[str]) -> dict:
    """All measurements at ``n`` peers; returns one row."""
    lease, hb = args.lease_timeout, args.heartbeat_interval
    total_a = args.warmup + args.rounds
    ctx = mp.get_context("spawn")  # gRPC and fork do not mix
    state_dir = tempfile.mkdtemp(prefix=f"dtrain-bench-cp-{n}-")
    coord, procs = None, []
    results, go, stop, die = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Event()
    shared = ctx.RawArray("d", 3)
    row = {"peers": n}
    try:
        coord, addr = start_coordinator(state_dir, lease, hb)
        groups = _groups(peer_ids(n), args.workers)
        row["worker_processes"] = len(groups) + 1
        # worker 0 is the victim, alone in its process
        specs = [(0, [VICTIM], dict(die=die, shared=shared))] + [(i + 1, g, {}) for i, g in enumerate(groups)]
        for wid, pids, extra in specs:
            p = ctx.Process(
                target=worker_main,
                args=(wid, addr, pids, total_a, results, go, stop),
                kwargs=extra,
                name=f"bench-peers-{wid}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        all_w = {wid: "" for wid, _, _ in specs}
        _collect(results, all_w, time.monotonic() + 120 + n, "ready")

        # (1) + (2): rounds
        events = EventLog(os.path.join(state_dir, "events.jsonl"))
        peer_pids = [p.pid for p in procs]
        cpu0, w0 = cpu_seconds(coord.pid), time.monotonic()
        pcpu0 = sum(cpu_seconds(pid) for pid in peer_pids)
        go.set()
        got = _collect(results, all_w, time.monotonic() + 600, "a_done")
        cpu1, w1 = cpu_seconds(coord.pid), time.monotonic()
        pcpu1 = sum(cpu_seconds(pid) for pid in peer_pids)
        records, errors = [], []
        for payload in got.values():
            records += payload["records"]
            errors += payload["errors"]
        if errors:
            raise PhaseError("peer failed during the rounds:\n" + errors[0])
        row.update(measure_rounds(records, events.read(), args.warmup, total_a))
        row["coord_cpu_pct"] = 100.0 * (cpu1 - cpu0) / (w1 - w0)
        row["peers_cpu_pct"] = 100.0 * (pcpu1 - pcpu0) / (w1 - w0)
        row["coord_cpu_ms_per_round"] = 1000.0 * (cpu1 - cpu0) / max(1, _committed(events.events, total_a))

        # (3): death of the victim while the others keep running rounds
        time.sleep(min(0.5, lease / 4))
        die.set()
        victim = procs[0]
        victim.join(10 * hb + 10)
        if victim.exitcode != -signal.SIGKILL:
            raise PhaseError(f"the peer to be killed did not die by SIGKILL (exit status {victim.exitcode})")
        last_end, latest_start = shared[1], shared[2]
        ref = max(last_end, latest_start)
        if latest_start > last_end:
            notes.append(
                f"{n} peers: a call of the killed peer started after its last successful one; "
                f"its start is taken as the moment of death"
            )
        deadline_s = 3 * lease + 20
        deadline = time.monotonic() + deadline_s
        expire = None
        while expire is None and time.monotonic() < deadline:
            expire = next(
                (e for e in events.read() if e.get("event") in ("expire", "leave") and e.get("peer_id") == VICTIM), None
            )
            if expire is None:
                time.sleep(0.02)
        if expire is None or expire["event"] != "expire":
            last = events.events[-1] if events.events else {}
            raise PhaseError(
                f"no expire event for the killed peer within {deadline_s:g}s (it exited with "
                f"{victim.exitcode}; last event {last.get('event')!r} "
                f"{time.time() - last.get('time', 0):.1f}s ago): {expire}"
            )
        row["detect_s"] = expire["time"] - ref
        row["lease_s"] = lease
        row["detect_ratio"] = row["detect_s"] / lease
        # recovery: the survivors commit a round without it
        recovered = None
        while recovered is None and time.monotonic() < deadline:
            recovered = next(
                (
                    e
                    for e in events.read()
                    if e.get("event") == "commit" and e["time"] >= expire["time"] and VICTIM not in e["members"]
                ),
                None,
            )
            if recovered is None:
                time.sleep(0.02)
        row["recovery_s"] = (recovered["time"] - expire["time"]) if recovered else float("nan")

        stop.set()
        done = _collect(results, {wid: "" for wid, _, _ in specs[1:]}, time.monotonic() + 60, "done")
        row["retries"] = sum(d["retries"] for d in done.values())
        late_errors = [e for d in done.values() for e in d["errors"]]
        if recovered is None:
            tail = [
                (e["event"], e.get("round"), e.get("peer_id") or len(e.get("members", []))) for e in events.events[-4:]
            ]
            notes.append(
                f"{n} peers: no commit without the killed peer within {deadline_s:g}s of its "
                f"expiry; last events {tail}"
                + (f"; a peer failed: {late_errors[0].strip().splitlines()[-1]}" if late_errors else "")
            )
        row["error"] = ""
    except PhaseError as e:
        notes.append(f"{n} peers: measurement failed: {str(e).splitlines()[0]}")
        print(f"control_plane: {n} peers failed: {e}", file=sys.stderr, flush=True)
        row["error"] = str(e).splitlines()[0]
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5.0)
        if coord is not None:
            stop_process(coord)
        results.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    return row


def _below(name: str, value: float, limit: float) -> dict:
    """A strict ``< limit`` target entry (``_common.target`` knows only <= and >=)."""
    return {
        "name": name,
        "value": float(value),
        "target": f"< {limit:g}",
        "met": bool(math.isfinite(value) and value < limit),
    }


def _committed(events: List[dict], total_a: int) -> int:
    return sum(1 for e in events if e.get("event") == "commit" and e["round"] < total_a)


def measure_rounds(records, events: List[dict], warmup: int, total_a: int) -> dict:
    timed = [rec for rec in records if warmup <= rec[1] < total_a]
    by_round: Dict[int, list] = {}
    for rec in timed:
        by_round.setdefault(rec[1], []).append(rec)
    quorum_ev = {(e["round"], e["quorum_id"]): e for e in events if e.get("event") == "quorum"}
    lat, form, deliver, sizes = [], [], [], []
    for r, recs in sorted(by_round.items()):
        last = max(recs, key=lambda x: x[2])  # the Sync call that started last
        lat.append(1000.0 * (last[4] - last[2]))
        sizes.append(last[8])
        ev = quorum_ev.get((r, last[7]))
        if ev is not None:
            form.append(1000.0 * (ev["time"] - last[3]))
            deliver.append(1000.0 * (last[5] - ev["time"]))
    rounds = len(by_round)
    span = (max(x[6] for x in timed) - min(x[2] for x in timed)) if timed else float("nan")
    return {
        "rounds": rounds,
        "rounds_per_s": rounds / span if span > 0 else float("nan"),
        "p50_quorum_ms": percentile(lat, 50),
        "p99_quorum_ms": percentile(lat, 99),
        "max_quorum_ms": max(lat) if lat else float("nan"),
        "formation_p50_ms": percentile(form, 50),
        "formation_p99_ms": percentile(form, 99),
        "delivery_p50_ms": percentile(deliver, 50),
        "delivery_p99_ms": percentile(deliver, 99),
        "quorum_size_min": min(sizes) if sizes else 0,
        "quorum_ms_by_round": [round(v, 3) for v in lat],
    }


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    import grpc

    notes: List[str] = []
    print(
        f"control_plane: grpcio {grpc.__version__}, {os.cpu_count()} CPUs, peers {args.peers}, "
        f"rounds {args.rounds} (+{args.warmup} warm-up), lease {args.lease_timeout:g}s, "
        f"heartbeat {args.heartbeat_interval:g}s, workers {args.workers}",
        flush=True,
    )
    rows = []
    for n in args.peers:
        t0 = time.monotonic()
        try:
            row = run_one(n, args, notes)
        except RuntimeError as e:  # the coordinator did not start: nothing can be measured
            print(f"control_plane: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return 1
        if not args.no_floor:
            try:
                groups = [1] + [len(g) for g in _groups(peer_ids(n), args.workers)]
                floor = _grpc_floor.measure(n, groups, args.rounds, args.warmup)
                row["floor_p50_ms"], row["floor_p99_ms"] = percentile(floor, 50), percentile(floor, 99)
            except RuntimeError as e:
                notes.append(f"{n} peers: gRPC floor failed: {str(e).splitlines()[0]}")
        row["wall_s"] = time.monotonic() - t0
        rows.append(row)
        print(f"  {n} peers done in {row['wall_s']:.1f}s", flush=True)

    nan = float("nan")
    print()
    print(
        format_table(
            [
                "peers",
                "procs",
                "rounds",
                "rounds/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "form p50",
                "form p99",
                "deliv p50",
                "floor p50",
                "floor p99",
                "coord CPU%",
                "coord ms/rnd",
                "peers CPU%",
            ],
            [
                [
                    r.get(k, nan)
                    for k in (
                        "peers",
                        "worker_processes",
                        "rounds",
                        "rounds_per_s",
                        "p50_quorum_ms",
                        "p99_quorum_ms",
                        "max_quorum_ms",
                        "formation_p50_ms",
                        "formation_p99_ms",
                        "delivery_p50_ms",
                        "floor_p50_ms",
                        "floor_p99_ms",
                        "coord_cpu_pct",
                        "coord_cpu_ms_per_round",
                        "peers_cpu_pct",
                    )
                ]
                for r in rows
            ],
            title="(1)+(2) rounds: every peer syncs, then votes ok; latency of the last Sync of each round",
        )
    )
    print()
    print(
        format_table(
            ["peers", "detect s", "lease s", "ratio", "recover s", "retries"],
            [
                [r.get(k, nan) for k in ("peers", "detect_s", "lease_s", "detect_ratio", "recovery_s", "retries")]
                for r in rows
            ],
            title="(3) a peer SIGKILLed mid-run: its last successful call -> its 'expire' event",
        )
    )

    at128 = next((r for r in rows if r["peers"] == 128), None)
    if at128 is None:
        notes.append("128 peers not in --peers: both targets are n/a (not met)")
    targets = [
        _below("p99_quorum_latency_ms_128", at128.get("p99_quorum_ms", nan) if at128 else nan, 50.0),
        target("death_detection_ratio_128", at128.get("detect_ratio", nan) if at128 else nan, "<= 1.10"),
    ]
    print()
    print(
        format_table(
            ["target", "value", "wanted", "met"], [[t["name"], t["value"], t["target"], t["met"]] for t in targets]
        )
    )
    notes.append(
        "latency: the Sync call that started last in each round, call start -> QUORUM reply; "
        "form = that call's start -> the 'quorum' event's logged time, deliv = event -> reply "
        "(event times have 1 ms resolution)"
    )
    if not args.no_floor:
        notes.append(
            "floor = the same Sync/Commit rounds, peers and processes against a bare grpc.aio server "
            "that only holds each call until all N peers called (bench/_grpc_floor.py): what gRPC "
            "Python itself costs here; no coordinator answering unary calls can be faster on this machine"
        )
    notes.append(
        f"peers run as threads in worker processes (procs: one per {PEERS_PER_WORKER} peers unless "
        "--workers says otherwise, plus one for the killed peer), so that one client process's GIL "
        f"does not serialise a quorum's replies; peer and coordinator processes share the machine's "
        f"{os.cpu_count()} CPUs (coord/peers CPU% = CPU time / wall time over the timed rounds)"
    )
    notes.append(
        "detect s = the 'expire' event's time - the end of the killed peer's last successful call "
        "; recover s = that event -> the next commit without the peer; retries = "
        "RETRY answers the survivors got (the killed peer's quorum)"
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
                "rounds": args.rounds,
                "warmup": args.warmup,
                "lease_timeout_s": args.lease_timeout,
                "heartbeat_interval_s": args.heartbeat_interval,
                "workers": args.workers,
                "grpcio": grpc.__version__,
                "cpus": os.cpu_count(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
