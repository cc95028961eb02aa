"""Turn a loaded run (``run_reader.Run``) into the plain series the report plots and its summary numbers.

No plotting here: every function returns lists and dicts, so the numbers can
be checked without matplotlib. Conventions:

- steps a restarted peer ran twice (after resuming from an older checkpoint)
  keep the record written last;
- ``random`` is the mean loss of the random subnets ``rand0``, ``rand1``, ...
  of a step;
- DiLoCo runs put evaluations on the round axis (step / H), others on steps;
- times are seconds since the run started (``Run.t0``);
- a peer's work (steps per round, compute utilisation, steps lost) is
  :func:`peer_work` of its records, the one definition ``dtrain-sim``'s
  summary uses too.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from .run_reader import PeerRun, Run
from .table import human

CHAOS = ("kill", "coordinator_restart", "cluster_restart", "link_reset", "link_stall", "slowdown")
Point = Tuple[float, float]


def loss_series(run: Run) -> Dict[str, Dict[str, List[Point]]]:
    """peer -> {"max" | "min" | "random": [(step, loss)]}; peers without step records left out."""
    out: Dict[str, Dict[str, List[Point]]] = {}
    for peer, pr in run.peers.items():
        by_step: Dict[int, dict] = {}
        for r in pr.of("step"):
            if isinstance(r.get("loss"), dict) and isinstance(r.get("step"), int):
                by_step[r["step"]] = r["loss"]
        groups: Dict[str, List[Point]] = defaultdict(list)
        for step in sorted(by_step):
            loss = {k: v for k, v in by_step[step].items() if isinstance(v, (int, float))}
            for name in ("max", "min"):
                if name in loss:
                    groups[name].append((step, float(loss[name])))
            rand = [v for k, v in loss.items() if k.startswith("rand")]
            if rand:
                groups["random"].append((step, sum(rand) / len(rand)))
        if groups:
            out[peer] = dict(groups)
    return out


def outer_period(run: Run) -> int:
    """H (inner steps per round) when the run's peers use DiLoCo, else 0."""
    for pr in run.peers.values():
        if period := peer_period(pr):
            return period
    return 0


def eval_metric(run: Run) -> str:
    """``bpb`` for language-model runs (eval records carry it), else ``acc``."""
    return "bpb" if any(r.get("bpb") is not None for _, r in run.records("eval")) else "acc"


def eval_series(run: Run) -> Tuple[str, str, Dict[Tuple[str, str, str], List[Point]]]:
    """(metric, x axis name, {(peer, split, arch_name): [(x, value)]})."""
    metric, period = eval_metric(run), outer_period(run)
    axis = "round" if period else "step"
    keyed: Dict[Tuple[str, str, str], Dict[float, float]] = defaultdict(dict)
    for peer, r in run.records("eval"):
        v = r.get(metric)
        if not isinstance(v, (int, float)) or not isinstance(r.get("step"), int):
            continue
        x = r["step"] / period if period else r["step"]
        keyed[(peer, str(r.get("split", "val")), str(r.get("arch_name", "?")))][x] = float(v)
    return metric, axis, {k: sorted(d.items()) for k, d in keyed.items()}


def round_records(run: Run) -> Dict[str, Dict[int, dict]]:
    """peer -> round -> its committed-round record (the last one written)."""
    out: Dict[str, Dict[int, dict]] = {}
    for peer, pr in run.peers.items():
        rounds = {int(r["round"]): r for r in pr.of("round") if isinstance(r.get("round"), int)}
        if rounds:
            out[peer] = rounds
    return out


def bytes_per_round(run: Run) -> Tuple[Dict[str, Dict[int, int]], Dict[int, int]]:
    """({peer: {round: bytes sent + received}}, {round: state-transfer bytes of heals to it})."""
    outer = {
        p: {r: int(rec.get("bytes_sent") or 0) + int(rec.get("bytes_recv") or 0) for r, rec in rr.items()}
        for p, rr in round_records(run).items()
    }
    heals: Dict[int, int] = defaultdict(int)
    for _, h in run.records("heal"):
        if isinstance(h.get("round"), int) and int(h.get("bytes") or 0) > 0:
            heals[h["round"]] += int(h["bytes"])
    return outer, dict(heals)


def round_time_split(run: Run) -> List[Tuple[int, float, float, float, float]]:
    """[(round, compute_s, comm_s, wait_s, other_s)], each the mean over the peers that recorded the round.

    ``other`` is what ``round_s`` holds beyond the three (outer step, checkpoint, ...)."""
    acc: Dict[int, List[Tuple[float, float, float, float]]] = defaultdict(list)
    for rr in round_records(run).values():
        for r, rec in rr.items():
            parts = [float(rec.get(k) or 0.0) for k in ("compute_s", "comm_s", "wait_s")]
            if not any(k in rec for k in ("compute_s", "comm_s", "wait_s")):
                continue
            total = float(rec.get("round_s") or 0.0)
            acc[r].append((*parts, max(0.0, total - sum(parts)) if total else 0.0))
    return [(r, *(sum(x[i] for x in v) / len(v) for i in range(4))) for r, v in sorted(acc.items())]


def round_steps(rec: dict, peer: str) -> Optional[int]:
    """Inner steps ``peer`` trained into the round of its round record ``rec``: the coordinator's count
    ``local_steps[peer]`` (0 for a member that sat the round out), else ``steps - steps_lost``; None when
    the record has neither (model-free peers, records older than per-peer steps)."""
    counted = rec.get("local_steps")
    if isinstance(counted, dict) and isinstance(counted.get(peer), int):
        return int(counted[peer])
    if isinstance(rec.get("steps"), int):
        return int(rec["steps"]) - int(rec.get("steps_lost") or 0)
    return None


def steps_per_round(run: Run) -> Dict[str, List[Point]]:
    """peer -> [(round, inner steps it trained into the round)] (:func:`round_steps`); peers without any left out."""
    out: Dict[str, List[Point]] = {}
    for peer, rr in round_records(run).items():
        pts: List[Point] = [(r, n) for r, rec in sorted(rr.items()) if (n := round_steps(rec, peer)) is not None]
        if pts:
            out[peer] = pts
    return out


def peer_work(peer: str, records: List[dict], period: int = 0) -> dict:
    """One peer's work, from its metrics records in file order; ``period``: H (0: unknown).

    - ``steps_per_round``: ``[[round, steps]]``, :func:`round_steps` of its round
      records (the last one written per round), and ``mean_steps_per_round``;
    - ``compute_utilisation``: ``compute_s / wall_s``, where ``wall_s`` is the time
      from its first round record to its last (their ``time``) and ``compute_s``
      the sum of ``compute_s`` (inner steps, emulated slowness included) of every
      round record after the first, i.e. the compute that falls in that window;
      compute a heal discarded is not in it. None with fewer than 2 round records;
    - ``steps_lost``: inner steps it trained that no committed round applied:
      ``steps_lost_rounds`` (``steps_lost`` of its round records: the probe step
      of a round it sat out), ``steps_lost_heals`` (``steps_lost`` of its heal
      records: steps trained before a heal replaced them) and
      ``steps_lost_after_last_round``: for each run of its process (a ``run``
      start or resume record begins one), the steps its records show past the
      step where its last round or heal of that run left it (``(round + 1) * H``
      after a round, ``round * H`` after a heal, the start step before either):
      a peer stopped, killed or left mid-round. It counts up to the last step a
      record shows (``step`` records come every ``log_every`` steps, so after a
      SIGKILL it is a lower bound); None when H is unknown (then not in
      ``steps_lost``);
    - ``capacity``: its top arch (None: the whole supernet), ``slice_fraction``
      (the share of the supernet's parameters it trains and sends; 1.0 when
      uncapped) and ``params_held`` / ``params_trained``, from its latest ``run``
      record; ``bytes_sent_per_round``: the mean ``bytes_sent`` of its round
      records (the outer payload it put on the wire).
    """
    rounds = [r for r in records if r.get("kind") == "round" and isinstance(r.get("round"), int)]
    by_round = {int(r["round"]): r for r in rounds}
    spr = [[r, n] for r, rec in sorted(by_round.items()) if (n := round_steps(rec, peer)) is not None]
    timed = sorted((float(r["time"]), r) for r in rounds if isinstance(r.get("time"), (int, float)))
    wall = timed[-1][0] - timed[0][0] if len(timed) >= 2 else 0.0
    compute = sum(float(r.get("compute_s") or 0.0) for _, r in timed[1:])
    lost_rounds = sum(int(r.get("steps_lost") or 0) for r in rounds)
    lost_heals = sum(int(r.get("steps_lost") or 0) for r in records if r.get("kind") == "heal")
    tail = _steps_after_last_round(records, period) if period > 0 else None
    runs = [r for r in records if r.get("kind") == "run" and r.get("event") in ("start", "resume")]
    run = runs[-1] if runs else {}
    sent = [float(r["bytes_sent"]) for r in rounds if isinstance(r.get("bytes_sent"), (int, float))]
    return {
        "capacity": run.get("top_arch"),
        "slice_fraction": run.get("slice_fraction"),
        "params_held": run.get("params_held"),
        "params_trained": run.get("params_trained"),
        "bytes_sent_per_round": (sum(sent) / len(sent)) if sent else None,
        "rounds": len(by_round),
        "steps_per_round": spr,
        "mean_steps_per_round": (sum(n for _, n in spr) / len(spr)) if spr else None,
        "compute_s": round(compute, 3),
        "wall_s": round(wall, 3),
        "compute_utilisation": (compute / wall) if wall > 0 else None,
        "steps_lost": lost_rounds + lost_heals + (tail or 0),
        "steps_lost_rounds": lost_rounds,
        "steps_lost_heals": lost_heals,
        "steps_lost_after_last_round": tail,
    }


def _steps_after_last_round(records: List[dict], period: int) -> int:
    """Steps past the last round / heal of each run of the process (see :func:`peer_work`)."""
    lost, anchor, furthest = 0, None, None
    for rec in records:
        kind, step = rec.get("kind"), rec.get("step")
        step = step if isinstance(step, int) else None
        if kind == "run" and rec.get("event") in ("start", "resume"):
            if anchor is not None and furthest is not None:
                lost += max(0, furthest - anchor)
            anchor, furthest = step, None
        elif kind == "round" and isinstance(rec.get("round"), int):
            anchor, furthest = max(step or 0, (int(rec["round"]) + 1) * period), None
        elif kind == "heal" and isinstance(rec.get("round"), int):
            anchor, furthest = int(rec["round"]) * period, None
        elif step is not None and kind in ("step", "eval", "summary", "run"):
            furthest = step if furthest is None else max(furthest, step)
    if anchor is not None and furthest is not None:
        lost += max(0, furthest - anchor)
    return lost


def peer_period(pr: PeerRun, default: int = 0) -> int:
    """H of one peer (its config.json), else ``default``."""
    outer = pr.config.get("outer") or {}
    if outer.get("name") == "diloco" and int(outer.get("sync_every") or 0) > 0:
        return int(outer["sync_every"])
    return default


def work_by_peer(run: Run) -> Dict[str, dict]:
    """peer -> :func:`peer_work` for the peers with round records."""
    period = outer_period(run)
    return {
        peer: peer_work(peer, pr.records, peer_period(pr, period)) for peer, pr in run.peers.items() if pr.of("round")
    }


def membership(run: Run) -> dict:
    """{"live": [(t, peers running)], "members": [(t, members)], "quorum": [(t, quorum size)],
    "events": [(t, kind, label)]}.

    A simulation gives the peer processes running (events.jsonl), the
    coordinator's members (its log: join, leave, lease expiry; emptied when
    the coordinator is restarted), the quorum of every commit and the chaos
    events; a single peer gives the quorum of its committed rounds."""
    t0 = run.t0() or 0.0
    live = _count_over_time(
        run.events,
        t0,
        add=lambda e: e.get("event") == "peer_start" and [e.get("peer")],
        remove=lambda e: (
            (e.get("event") == "peer_exit" and [e.get("peer")])
            or (e.get("event") == "cluster_restart" and e.get("peers_killed"))
        ),
    )
    restarts = [
        {"time": e["time"], "event": "_reset"}
        for e in run.events
        if e.get("event") in ("coordinator_restart", "cluster_restart") and "time" in e
    ]
    clog = sorted(run.coordinator + restarts, key=lambda e: e.get("time") or 0.0)
    members = _count_over_time(
        clog,
        t0,
        add=lambda e: e.get("event") == "join" and [e.get("peer_id")],
        remove=lambda e: e.get("event") in ("leave", "expire") and [e.get("peer_id")],
        reset=lambda e: e.get("event") == "_reset",
    )
    quorum = [
        (t, len(ev.get("members") or []))
        for ev in run.coordinator
        if ev.get("event") == "commit" and (t := _t(ev, t0)) is not None
    ]
    if not quorum:
        seen: Dict[int, Point] = {}
        for rr in round_records(run).values():
            for r, rec in rr.items():
                t = _t(rec, t0)
                if t is not None and r not in seen:
                    seen[r] = (t, int(rec.get("quorum_size") or len(rec.get("members") or [])))
        quorum = sorted(seen.values())
    return {"live": live, "members": members, "quorum": sorted(quorum), "events": chaos_events(run, t0)}


def chaos_events(run: Run, t0: float) -> List[Tuple[float, str, str]]:
    """[(t, kind, label)] of faults injected and of the peers started by chaos (joins, restarts)."""
    events = []
    for ev in run.events:
        kind, t = ev.get("event"), _t(ev, t0)
        if t is None:
            continue
        if kind in CHAOS:
            who = ev.get("peer") or "-".join(str(ev[k]) for k in ("a", "b") if ev.get(k)) or ""
            sig = f" ({ev['signal']})" if ev.get("signal") else ""
            if kind == "slowdown" and isinstance(ev.get("speed"), (int, float)):
                sig = f" (x{ev['speed']:g})"
            events.append((t, kind, f"{kind.replace('_', ' ')} {who}{sig}".strip()))
        elif kind == "peer_start" and ev.get("reason") in ("chaos join", "restart"):
            label = "join" if ev["reason"] == "chaos join" else "restart"
            events.append((t, label, f"{label} {ev.get('peer', '')}".strip()))
    return events


def _count_over_time(records: List[dict], t0: float, add, remove, reset=lambda e: False) -> List[Point]:
    """[(t, size)] of a set that ``add`` / ``remove`` (lists of names, or falsy) change, per record."""
    names: set = set()
    out: List[Point] = []
    for rec in records:
        t = _t(rec, t0)
        if t is None:
            continue
        if reset(rec):
            names.clear()
        names.update(add(rec) or [])
        names.difference_update(remove(rec) or [])
        if not out or out[-1][1] != len(names):
            out.append((t, len(names)))
    return out


def _t(rec: dict, t0: float) -> Optional[float]:
    v = rec.get("time")
    return float(v) - t0 if isinstance(v, (int, float)) else None


# ------------------------------------------------------------------ summary numbers
def final_results(run: Run) -> Tuple[Dict[str, float], str]:
    """({"max": v, "min": v}, split) of the run's final evaluation: the test split, else val."""
    metric = eval_metric(run)
    sim_acc = run.summary.get("final_accuracy") or {}
    if metric == "acc" and sim_acc:  # dtrain.sim.summary: test accuracy of the peers' summary.json
        return {k: float(v) for k, v in sim_acc.items() if k in ("max", "min")}, "test"
    for split in ("test", "val"):
        out: Dict[str, float] = {}
        for pr in run.peers.values():
            res = pr.summary.get("results") or {}
            for arch in ("max", "min"):
                v = (res.get(arch) or {}).get(f"{split}_{metric}")
                if isinstance(v, (int, float)):
                    out.setdefault(arch, float(v))
        last: Dict[str, Tuple[int, float]] = {}
        for _, r in run.records("eval"):
            if (
                r.get("split", "val") == split
                and r.get("arch_name") in ("max", "min")
                and isinstance(r.get(metric), (int, float))
                and r.get("step", 0) >= last.get(r["arch_name"], (-1, 0.0))[0]
            ):
                last[r["arch_name"]] = (r.get("step", 0), float(r[metric]))
        for arch, (_, v) in last.items():
            out.setdefault(arch, v)
        if out:
            return out, split
    return {}, ""


def summary_rows(run: Run) -> List[Tuple[str, str]]:
    """(name, value) rows of the report's summary table."""
    s, rows = run.summary, []
    period = outer_period(run)
    if run.kind == "sim":
        kind = f"dtrain-sim, {len(run.peers)} peer(s) over the run"
    else:
        kind = "single peer" + (f", DiLoCo outer loop (H={period})" if period else "")
    rows.append(("run", kind))
    steps = [r["step"] for _, r in run.records("step") if isinstance(r.get("step"), int)]
    steps += [pr.summary["step"] for pr in run.peers.values() if isinstance(pr.summary.get("step"), int)]
    rows.append(("steps", str(max(steps)) if steps else "-"))
    rr = round_records(run)
    committed = s.get("rounds_committed", run.coordinator_state.get("committed_round"))
    if committed is None and rr:
        committed = len({r for d in rr.values() for r in d})
    rows.append(
        (
            "rounds committed",
            "-"
            if committed is None
            else str(committed) + (f" of {s['rounds_target']}" if s.get("rounds_target") else ""),
        )
    )
    metric = eval_metric(run)
    res, split = final_results(run)
    fmt = (lambda v: f"{100 * v:.2f}%") if metric == "acc" else (lambda v: f"{v:.3f} bpb")
    rows.append(
        (
            f"final {split + ' ' if split else ''}{'accuracy' if metric == 'acc' else 'bits per byte'} (max / min)",
            " / ".join(fmt(res[k]) if k in res else "-" for k in ("max", "min")),
        )
    )
    if "faults_injected" in s:
        faults = ", ".join(f"{k}: {v}" for k, v in sorted((s.get("faults") or {}).items()))
        rows.append(("faults injected", f"{s['faults_injected']}" + (f" ({faults})" if faults else "")))
        rows.append(
            ("recoveries", f"{s.get('recoveries', 0)} ({s.get('heals', 0)} heals, {s.get('retries', 0)} round retries)")
        )
    if "parity" in s:
        rows.append(("parity", ("ok" if s["parity"] else "FAILED") + f" ({s.get('rounds_checked', 0)} rounds checked)"))
        rows.append(("rounds lost", str(s.get("rounds_lost", 0))))
    sent = sum(int(rec.get("bytes_sent") or 0) for d in rr.values() for rec in d.values())
    heal = sum(int(h.get("bytes") or 0) for _, h in run.records("heal"))
    if rr or heal:
        rows.append(("bytes moved", f"{human(sent + heal)}B (outer {human(sent)}B, state transfer {human(heal)}B)"))
    compute = sum(float(rec.get("compute_s") or 0.0) for d in rr.values() for rec in d.values())
    total = sum(float(rec.get("round_s") or 0.0) for d in rr.values() for rec in d.values())
    if total > 0:
        rows.append(("mean compute utilisation", f"{100 * compute / total:.1f}%"))
    rows += _work_rows(work_by_peer(run))
    if run.torn_lines:
        rows.append(("torn lines skipped", str(len(run.torn_lines))))
    return rows


def _work_rows(work: Dict[str, dict]) -> List[Tuple[str, str]]:
    """Per-peer rows of :func:`peer_work`: steps per round, compute utilisation, steps lost."""
    rows: List[Tuple[str, str]] = []
    peers = sorted(work)
    stepped = [p for p in peers if work[p]["mean_steps_per_round"] is not None]
    if stepped:
        rows.append(
            ("inner steps per round (mean)", ", ".join(f"{p} {work[p]['mean_steps_per_round']:.1f}" for p in stepped))
        )
    util = [p for p in peers if work[p]["compute_utilisation"] is not None]
    if util and (stepped or len(peers) > 1):
        rows.append(
            (
                "compute utilisation per peer",
                ", ".join(f"{p} {100 * work[p]['compute_utilisation']:.1f}%" for p in util),
            )
        )
    if stepped:
        total = sum(work[p]["steps_lost"] for p in peers)
        rows.append(("steps lost", f"{total} (" + ", ".join(f"{p} {work[p]['steps_lost']}" for p in peers) + ")"))
    return rows
