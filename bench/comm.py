"""Benchmark: bytes on the wire per inner step, ddp vs DiLoCo at H in {10, 50, 125, 250} x every codec.

Measured with model-free DiLoCo peers (``python -m dtrain.sim.model_free_peer``,
the production outer-loop path: RoundEngine, codecs, the collectives) on
loopback: one coordinator subprocess (``min_peers`` = k, a long grace window,
so every round has all k members) and k sim-peer subprocesses (``--peers``,
default 3) on a flat fp32 vector of N values (``--numel``; default: the
parameter count of the default tiny supernet, ``conf/model/mbv3_tiny.yaml``
built with ``dtrain.supernet.build_supernet``). Round r uses codec
``codecs[r mod C]`` (the model-free peer's schedule), so ``--rounds`` R rounds per codec
is one run of R x C rounds.

The bytes of a round are read from the collective's transport counters in the
round records (``bytes_sent`` / ``bytes_recv``: the grpc collective counts
every ShardChunk message as ``ByteSize() + 5``, HTTP/2 and TCP framing not
included). Only rounds with all k members and one attempt are used; a
round's bytes = the mean over those member-rounds of ``bytes_sent`` (sent =
received on average; both are in the JSON).

    ddp:    every inner step is a round whose payload is the fp32 gradient:
            bytes/step = one fp32 round's bytes (same N, same collective).
    DiLoCo: one round every H inner steps: bytes/step = one round's bytes / H.
            The bytes of a round do not depend on H, so each codec is
            measured once and the H rows are derived from it.

Prediction per member and round (grpc: reduce-scatter + all-gather, shard
starts aligned to the codec block, so the shards' encodings add up to the
whole vector's): 2(k-1)/k * encoded_size(N); the difference to the measured
bytes is the per-chunk message header. ``--backends grpc,gloo`` adds gloo
rows: gloo has no transport counters, its "measured" bytes are what its
algorithm moves (fp32: 2(k-1)/k * 4N ring allreduce; other codecs: all_gather
of (k-1) * (1 + encoded_size(N))), so they equal the prediction by
construction. Overhead % is measured / ideal - 1, ideal = the same algorithm
moving 4 bytes (fp32) or the codec's bits per value, without scales or headers.

Targets (grpc): int4_H125_vs_ddp_fp32 = ddp bytes/step / DiLoCo-int4 bytes/step
at H=125 >= 900, int4_H250_vs_ddp_fp32 at H=250 >= 1800. A missed target is
reported (``met: false``); the exit status stays 0.

    python bench/comm.py [--peers 3] [--numel N] [--rounds 3] [--H 10,50,125,250]
                         [--codecs fp32,fp16,bf16,int8,int4] [--backends grpc]
                         [--chunk-bytes B] [--streams S] [--timeout 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, member_count, positive_float, positive_int, ratio, target, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e``
    sys.path.insert(1, str(ROOT))

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
BACKENDS = ("grpc", "gloo")
DEFAULT_H = (10, 50, 125, 250)
TINY_MODEL_YAML = ROOT / "conf" / "model" / "mbv3_tiny.yaml"
TARGETS = (("int4_H125_vs_ddp_fp32", 125, ">= 900"), ("int4_H250_vs_ddp_fp32", 250, ">= 1800"))


# --------------------------------------------------------------------------- arguments


def _name_list(allowed: Tuple[str, ...], what: str):
    def parse(text: str) -> List[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} from {', '.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(names))

    return parse


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return sorted(set(vals))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peers", type=member_count, default=3, help="sim peers k (3)")
    p.add_argument(
        "--numel",
        type=positive_int,
        default=None,
        help="values per round (default: parameter count of the tiny supernet, mbv3_tiny)",
    )
    p.add_argument("--rounds", type=positive_int, default=3, help="measured rounds per codec and backend (3)")
    p.add_argument(
        "--H",
        dest="H",
        type=_int_list,
        default=list(DEFAULT_H),
        help="inner steps per DiLoCo round to derive rows for (10,50,125,250)",
    )
    p.add_argument(
        "--codecs",
        type=_name_list(CODECS, "codecs"),
        default=list(CODECS),
        help="codecs (all five; fp32 is always measured: it is the ddp baseline)",
    )
    p.add_argument(
        "--backends",
        type=_name_list(BACKENDS, "backends"),
        default=["grpc"],
        help="collectives (grpc; gloo has no transport counters)",
    )
    p.add_argument(
        "--chunk-bytes", type=positive_int, default=None, help="grpc chunk size (the model-free peer's default)"
    )
    p.add_argument(
        "--streams",
        type=positive_int,
        default=None,
        help="grpc streams per destination (the model-free peer's default)",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=600.0, help="give up on the sim peers after this many seconds (600)"
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from dtrain.comm.grpc_allreduce import MAX_STREAMS
    from dtrain.wire.snapshot import MAX_CHUNK_BYTES

    if args.chunk_bytes is not None and args.chunk_bytes > MAX_CHUNK_BYTES:
        p.error(f"argument --chunk-bytes: at most {MAX_CHUNK_BYTES}, got {args.chunk_bytes}")
    if args.streams is not None and args.streams > MAX_STREAMS:
        p.error(f"argument --streams: at most {MAX_STREAMS}, got {args.streams}")
    if "fp32" not in args.codecs:
        args.codecs = ["fp32"] + args.codecs
    args.codecs = [c for c in CODECS if c in args.codecs]
    if args.json:
        parent = Path(args.json).resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"argument --json: cannot create directory {parent}: {e.strerror}")
        if not os.access(parent, os.W_OK):
            p.error(f"argument --json: directory {parent} is not writable")


# --------------------------------------------------------------------------- model size and predictions


def tiny_supernet_numel() -> int:
    """Parameter count of the default tiny supernet (what a trainer peer's FlatLayout sends)."""
    from omegaconf import OmegaConf

    from dtrain.supernet import build_supernet

    d = OmegaConf.to_container(OmegaConf.load(TINY_MODEL_YAML), resolve=True)
    d.pop("defaults", None)
    model = build_supernet(d)
    return sum(p.numel() for p in model.parameters())


def predicted_round_bytes(backend: str, codec: str, n: int, k: int) -> float:
    """Payload bytes one member sends per round (no message headers)."""
    from dtrain.outer.codecs import get_codec

    size = get_codec(codec).encoded_size(n)
    if backend == "gloo":
        return float(2 * (k - 1) * 4 * n // k) if codec == "fp32" else float((k - 1) * (1 + size))
    return 2.0 * (k - 1) / k * size


def ideal_round_bytes(backend: str, codec: str, n: int, k: int) -> float:
    """The same algorithm at exactly 4 bytes (fp32) or the codec's bits per value: no scales, no headers."""
    per_value = BITS[codec] / 8.0
    if backend == "gloo" and codec != "fp32":
        return (k - 1) * n * per_value  # all_gather of every member's whole vector
    return 2.0 * (k - 1) / k * n * per_value


# --------------------------------------------------------------------------- processes


def _env() -> Dict[str, str]:
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.pop("DTRAIN_TOKEN", None)
    return env


def start_coordinator(state_dir: str, k: int, gloo: bool, timeout: float = 120.0):
    """The coordinator subprocess and its ``host:port``. Every round waits for all k peers
    (min_peers = k, a grace window longer than any round)."""
    out_path, err_path = os.path.join(state_dir, "coordinator.out"), os.path.join(state_dir, "coordinator.err")
    argv = [
        sys.executable,
        "-m",
        "dtrain.cli.coordinator",
        f"state_dir={state_dir}",
        "port=0",
        f"min_peers={k}",
        "grace_s=300",
        "commit_timeout_s=300",
        "lease_timeout_s=30",
        "heartbeat_interval_s=2",
        f"gloo_store={'true' if gloo else 'false'}",
    ]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=state_dir, env=_env())
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
            raise RuntimeError(f"coordinator did not start (exit status {proc.returncode}): {_tail(err_path)}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s; by PID only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return " | ".join(line for line in text[-n:].splitlines() if line.strip())


def sim_peer_command(args, addr: str, peer_id: str, rounds: int, out: str, numel: int) -> List[str]:
    argv = [
        sys.executable,
        "-m",
        "dtrain.sim.model_free_peer",
        "--coordinator",
        addr,
        "--peer-id",
        peer_id,
        "--rounds",
        str(rounds),
        "--out",
        out,
        "--numel",
        str(numel),
        "--codecs",
        ",".join(args.codecs),
        "--backends",
        ",".join(args.backends),
        "--deadline-s",
        "120",
        "--sync-timeout-s",
        "300",
        "--join-timeout",
        "120",
        "--rpc-timeout",
        "30",
    ]
    if args.chunk_bytes is not None:
        argv += ["--chunk-bytes", str(args.chunk_bytes)]
    if args.streams is not None:
        argv += ["--streams", str(args.streams)]
    return argv


def read_records(path: str) -> List[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n") and line.strip():
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def run_peers(args, numel: int, notes: List[str]) -> List[dict]:
    """Coordinator + k sim peers until every peer finished its rounds; all their round records."""
    k = args.peers
    total_rounds = args.rounds * len(args.codecs) * len(args.backends)
    work = tempfile.mkdtemp(prefix="dtrain-bench-comm-")
    coord, peers = None, []
    try:
        coord, addr = start_coordinator(work, k, "gloo" in args.backends)
        for i in range(k):
            pid = f"peer-{i}"
            err = open(os.path.join(work, f"{pid}.err"), "wb")
            try:
                proc = subprocess.Popen(
                    sim_peer_command(args, addr, pid, total_rounds, os.path.join(work, f"{pid}.jsonl"), numel),
                    stdout=err,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    cwd=work,
                    env=_env(),
                )
            finally:
                err.close()
            peers.append((pid, proc))
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for _, p in peers):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"sim peers did not finish {total_rounds} rounds in {args.timeout:g}s "
                    f"(state dir tail: {_tail(os.path.join(work, 'coordinator.err'), 400)})"
                )
            if any(p.poll() not in (None, 0) for _, p in peers):
                break
            time.sleep(0.1)
        failed = [(pid, p.returncode) for pid, p in peers if p.poll() not in (None, 0)]
        if failed:
            pid, rc = failed[0]
            raise RuntimeError(f"sim peer {pid} exited with status {rc}: {_tail(os.path.join(work, f'{pid}.err'))}")
        records = []
        for pid, _ in peers:
            records += [r for r in read_records(os.path.join(work, f"{pid}.jsonl")) if r.get("kind") == "round"]
        return records
    finally:
        for _, p in peers:
            stop_process(p)
        if coord is not None:
            stop_process(coord)
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- measurement


def measure(records: List[dict], args, numel: int, notes: List[str]) -> Dict[Tuple[str, str], dict]:
    """(backend, codec) -> bytes of one round for one member, from the round records."""
    k = args.peers
    out: Dict[Tuple[str, str], dict] = {}
    for backend in args.backends:
        for codec in args.codecs:
            recs = [r for r in records if r.get("backend") == backend and r.get("codec") == codec]
            good = [
                r
                for r in recs
                if len(r.get("members") or []) == k and r.get("attempts") == 1 and r.get("numel") == numel
            ]
            if len(good) != len(recs):
                notes.append(
                    f"{backend}/{codec}: {len(recs) - len(good)} member-round(s) left out "
                    f"(fewer than {k} members, a retry, or another numel)"
                )
            sent = [float(r["bytes_sent"]) for r in good]
            recv = [float(r["bytes_recv"]) for r in good]
            comm = [float(r["comm_s"]) for r in good]
            nan = float("nan")
            pred = predicted_round_bytes(backend, codec, numel, k)
            ideal = ideal_round_bytes(backend, codec, numel, k)
            mean_sent = statistics.fmean(sent) if sent else nan
            out[(backend, codec)] = {
                "backend": backend,
                "codec": codec,
                "k": k,
                "numel": numel,
                "member_rounds": len(good),
                "rounds": len({r["round"] for r in good}),
                "bytes_sent_mean": mean_sent,
                "bytes_sent_min": min(sent) if sent else nan,
                "bytes_sent_max": max(sent) if sent else nan,
                "bytes_recv_mean": statistics.fmean(recv) if recv else nan,
                "predicted_bytes": pred,
                "ideal_bytes": ideal,
                "header_bytes": mean_sent - pred,
                "comm_ms_median": 1000.0 * statistics.median(comm) if comm else nan,
            }
    return out


def per_step_rows(meas: Dict[Tuple[str, str], dict], args) -> List[dict]:
    rows = []
    for backend in args.backends:
        base = meas[(backend, "fp32")]
        ddp_step = base["bytes_sent_mean"]

        def row(mode: str, h: int, m: dict, backend: str = backend, ddp_step: float = ddp_step) -> dict:
            measured = m["bytes_sent_mean"] / h
            return {
                "mode": mode,
                "H": h,
                "codec": m["codec"],
                "backend": backend,
                "measured_bytes_per_step": measured,
                "predicted_bytes_per_step": m["predicted_bytes"] / h,
                "ideal_bytes_per_step": m["ideal_bytes"] / h,
                "overhead_pct": 100.0 * (ratio(m["bytes_sent_mean"], m["ideal_bytes"]) - 1.0),
                "reduction_vs_ddp": ratio(ddp_step, measured),
            }

        rows.append(row("ddp", 1, base))
        for h in args.H:
            for codec in args.codecs:
                rows.append(row("diloco", h, meas[(backend, codec)]))
    return rows


# --------------------------------------------------------------------------- main


def _b(v: float):
    """A byte count for the table: whole bytes from 1000 on (the table's float format keeps 4 digits)."""
    return int(round(v)) if isinstance(v, float) and math.isfinite(v) and abs(v) >= 1000 else v


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    notes: List[str] = []
    if args.numel is None:
        numel = tiny_supernet_numel()
        n_from = f"the tiny supernet's parameter count ({TINY_MODEL_YAML.relative_to(ROOT)})"
    else:
        numel, n_from = args.numel, "--numel"
    k = args.peers
    print(
        f"comm: k={k} sim peers, N={numel} ({n_from}), {args.rounds} round(s) per codec and backend, "
        f"codecs {','.join(args.codecs)}, backends {','.join(args.backends)}, H {args.H}",
        flush=True,
    )
    t0 = time.monotonic()
    try:
        records = run_peers(args, numel, notes)
    except RuntimeError as e:
        print(f"comm: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"  {len(records)} member-rounds recorded in {time.monotonic() - t0:.1f}s", flush=True)
    meas = measure(records, args, numel, notes)
    rows = per_step_rows(meas, args)

    print()
    print(
        format_table(
            [
                "backend",
                "codec",
                "rounds",
                "sent B/round",
                "recv B/round",
                "min",
                "max",
                "predicted",
                "header B",
                "comm ms",
            ],
            [
                [
                    m["backend"],
                    m["codec"],
                    m["rounds"],
                    _b(m["bytes_sent_mean"]),
                    _b(m["bytes_recv_mean"]),
                    _b(m["bytes_sent_min"]),
                    _b(m["bytes_sent_max"]),
                    _b(m["predicted_bytes"]),
                    m["header_bytes"],
                    m["comm_ms_median"],
                ]
                for m in meas.values()
            ],
            title="one round, per member (mean over members and rounds; predicted = "
            "2(k-1)/k * encoded_size(N) for grpc)",
        )
    )
    print()
    print(
        format_table(
            ["mode", "H", "codec", "backend", "measured B/step", "predicted B/step", "overhead %", "vs ddp"],
            [
                [
                    r["mode"],
                    r["H"],
                    r["codec"],
                    r["backend"],
                    _b(r["measured_bytes_per_step"]),
                    _b(r["predicted_bytes_per_step"]),
                    r["overhead_pct"],
                    r["reduction_vs_ddp"],
                ]
                for r in rows
            ],
            title="bytes on the wire per inner step, per member (ddp: one fp32 round per step; DiLoCo: a round / H)",
        )
    )

    nan = float("nan")
    targets = []
    grpc_ok = "grpc" in args.backends and "int4" in args.codecs
    if not grpc_ok:
        notes.append("the targets need the grpc backend and the int4 codec: n/a (not met)")
    for name, h, bound in TARGETS:
        if grpc_ok:
            ddp = meas[("grpc", "fp32")]["bytes_sent_mean"]
            int4 = meas[("grpc", "int4")]["bytes_sent_mean"] / h
            value = ratio(ddp, int4)
        else:
            value = nan
        targets.append(target(name, value, bound))
    print()
    print(
        format_table(
            ["target", "value", "wanted", "met"], [[t["name"], t["value"], t["target"], t["met"]] for t in targets]
        )
    )
    notes.append(
        "the bytes of a round do not depend on H: every codec is measured once (its rounds), and the "
        "per-H rows divide that round's bytes by H; ddp = one fp32 round per inner step (the trainer's "
        "ddp mode sends the fp32 gradient through the same collective every step); the targets use "
        "H = 125 and 250 whatever --H lists"
    )
    notes.append(
        "measured = the collective's own counters in the round records (grpc: ShardChunk ByteSize()+5 "
        "per message; HTTP/2, TCP and TLS framing not counted), bytes_sent per member, mean over "
        "members and rounds (min/max: single member-rounds; members differ a little because their "
        "shards differ by up to one codec block)"
    )
    notes.append(
        "overhead % = measured / ideal - 1, ideal = the same algorithm at 4 bytes (fp32) or the codec's "
        "bits per value (no block scales, no headers); header B = measured - predicted (per-chunk "
        "message fields)"
    )
    if "gloo" in args.backends:
        notes.append(
            "gloo: no transport counters reachable from Python; its round bytes are what its algorithm "
            "moves (fp32 ring allreduce 2(k-1)/k*4N, other codecs all_gather (k-1)*(1+encoded_size)), "
            "equal to the prediction by construction"
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
            rounds=list(meas.values()),
            settings={
                "peers": k,
                "numel": numel,
                "numel_from": n_from,
                "rounds": args.rounds,
                "H": args.H,
                "codecs": args.codecs,
                "backends": args.backends,
                "chunk_bytes": args.chunk_bytes,
                "streams": args.streams,
                "cpus": os.cpu_count(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
