"""Read a simulation's run dir and judge it: parity, rounds lost, faults, recoveries, bytes, accuracy.

Parity (the project's promise): every peer that completed round r reports the
same state hash for S_{r+1} (``round`` records), every heal to round r
adopted that same S_r, and the coordinator's commit of round r names the
hash the peers held for S_r. A round is **lost** when the coordinator
committed it but no peer recorded applying it (a round record, or a heal to
the state after it), or when the coordinator's committed round went
backwards across a restart.

Each peer's work (``peers.<id>``, one definition with ``dtrain-report``:
:func:`dtrain.obs.run_series.peer_work`):

- ``speed``: its ``sim.speed`` (the emulated speed it was started with);
  ``slowed_to``: the speed a ``chaos.slowdown`` throttled it to, else null;
- ``steps_per_round``: ``[[round, steps]]``, the inner steps it trained into
  each round it recorded (the coordinator's ``local_steps[peer]``; 0 for a
  round it sat out), and ``mean_steps_per_round``;
- ``compute_utilisation``: compute time over wall time, ``compute_s /
  wall_s``: ``wall_s`` runs from its first round record to its last (their
  ``time``), ``compute_s`` sums the ``compute_s`` of every round record
  after the first (the inner steps in that window, emulated slowness and
  throttling included; not the collectives, Sync / Commit waits or outer
  step). Null with fewer than 2 round records;
- ``steps_lost``: inner steps it trained that no committed round applied:
  ``steps_lost_rounds`` (the probe step of rounds it sat out),
  ``steps_lost_heals`` (steps a heal replaced) and
  ``steps_lost_after_last_round`` (per run of its process, the steps its
  records show past the step its last round or heal left it at: stopped,
  killed or left mid-round; after a SIGKILL a lower bound, since ``step``
  records come every ``log_every`` steps; null when H is unknown, e.g.
  model-free peers).

The top-level ``compute_utilisation`` is the mean over every round record
of every peer (sum of ``compute_s`` over sum of ``round_s``), ``steps_lost``
the sum over peers. ``slowdowns`` lists each ``chaos.slowdown``: ``t``
(seconds since the simulation started), ``peer``, ``speed``,
``committed_round`` (c: round c was in progress when it hit),
``assigned_before`` (the mean of the steps the coordinator's last three
quorums before it assigned the peer, fewer if fewer did, H if none did; one
assignment alone follows the noise of one measured step rate),
``assigned_after`` (``[[round, steps]]`` of the quorums after it, the first
six; from the coordinator's ``quorum`` events) and
``followed_after_rounds``: ``r - c + 1`` for the first
round r whose quorum assigned the peer at most halfway between
``assigned_before`` and ``assigned_before * speed`` (1: the quorum of the
round in progress already did; 2: the next round's); null when none did
(e.g. ``outer.local_steps=fixed``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List

from ..obs.run_series import peer_work
from ..obs.table import format_table, human

FAULTS = ("kill", "coordinator_restart", "cluster_restart", "link_reset", "link_stall")


def read_jsonl(path: str) -> List[dict]:
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out


def _peer_dirs(run_dir: str) -> Dict[str, str]:
    return {
        d[5:]: os.path.join(run_dir, d)
        for d in sorted(os.listdir(run_dir))
        if d.startswith("peer-") and os.path.isdir(os.path.join(run_dir, d))
    }


def summarize(
    run_dir: str,
    target_rounds: int,
    status: str = "ok",
    error: str = "",
    lost_by_restart: int = 0,
    link_bytes: Dict[str, int] = None,
    require_falling_loss: bool = False,
    inner_steps: int = 0,
) -> dict:
    """The judged run (see the module doc); ``inner_steps``: H of peers without a DiLoCo config.json."""
    after: Dict[int, Dict[str, str]] = defaultdict(dict)  # round r -> peer -> hash of S_{r+1}
    heals: List[dict] = []
    rounds = []
    losses_max: List[float] = []
    accuracy: Dict[str, float] = {}
    work: Dict[str, dict] = {}
    for peer, d in _peer_dirs(run_dir).items():
        records = read_jsonl(os.path.join(d, "metrics.jsonl"))
        if any(r.get("kind") in ("round", "heal", "run") for r in records):  # also a peer that never committed
            work[peer] = peer_work(peer, records, _period(d, inner_steps))
        for rec in records:
            kind = rec.get("kind")
            if kind == "round":
                after[int(rec["round"])][peer] = rec["state_hash"]
                rounds.append(rec)
            elif kind == "heal":
                heals.append({**rec, "peer": peer})
            elif kind == "step" and isinstance(rec.get("loss"), dict) and "max" in rec["loss"]:
                losses_max.append((rec["step"], rec["loss"]["max"]))
        try:
            with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
                res = json.load(f).get("results", {})
            for arch in ("max", "min"):
                if "test_acc" in res.get(arch, {}) and arch not in accuracy:
                    accuracy[arch] = res[arch]["test_acc"]
        except (OSError, ValueError, AttributeError):
            pass
    problems: List[str] = []
    for r, by_peer in sorted(after.items()):
        if len(set(by_peer.values())) > 1:
            problems.append(
                f"round {r}: peers disagree: " + ", ".join(f"{p}={h[:12]}" for p, h in sorted(by_peer.items()))
            )
    for h in heals:
        r = int(h["round"])
        want = next(iter(set(after.get(r - 1, {}).values())), None)
        if want is not None and h.get("state_hash") and h["state_hash"] != want:
            problems.append(f"heal of {h['peer']} to round {r}: adopted {h['state_hash'][:12]}, peers hold {want[:12]}")
    coord_events = read_jsonl(os.path.join(run_dir, "coordinator", "events.jsonl"))
    commits: Dict[int, dict] = {}
    for ev in coord_events:
        if ev.get("event") != "commit":
            continue
        r = int(ev["round"])
        if r in commits and commits[r].get("quorum_id") != ev.get("quorum_id"):
            problems.append(
                f"round {r} committed twice (quorums {commits[r].get('quorum_id')} and {ev.get('quorum_id')})"
            )
        commits[r] = ev
        before = next(iter(set(after.get(r - 1, {}).values())), None) if r > 0 else None
        if before is not None and ev.get("state_hash") and ev["state_hash"] != before:
            problems.append(
                f"round {r}: the coordinator committed from {ev['state_hash'][:12]}, peers held {before[:12]}"
            )
    try:
        with open(os.path.join(run_dir, "coordinator", "state.json"), encoding="utf-8") as f:
            committed = int(json.load(f)["committed_round"])
    except (OSError, ValueError, KeyError):
        committed = 0
    healed_to = {int(h["round"]) for h in heals}  # S_{r+1} reached a peer: round r was applied somewhere
    unrecorded = sorted(r for r in commits if r not in after and r + 1 not in healed_to)
    lost = len(unrecorded) + lost_by_restart
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    slowdowns = _slowdowns(run_dir, events, coord_events, inner_steps)
    for ev in events:
        if ev.get("event") == "peer_start" and ev.get("peer") in work and "speed" in ev:
            work[ev["peer"]]["speed"] = ev["speed"]
    for sd in slowdowns:
        if sd["peer"] in work:
            work[sd["peer"]]["slowed_to"] = sd["speed"]
    peers = {p: {"speed": w.pop("speed", 1.0), "slowed_to": w.pop("slowed_to", None), **w} for p, w in work.items()}
    faults = defaultdict(int)
    for ev in events:
        if ev.get("event") in FAULTS:
            faults[ev["event"] if ev["event"] != "kill" else f"kill_{ev.get('signal', '').lower()}"] += 1
    joins = sum(1 for ev in events if ev.get("event") == "peer_start" and ev.get("reason") in ("chaos join", "restart"))
    retries = sum(max(0, int(r.get("attempts", 1)) - 1) for r in rounds)
    compute = sum(float(r.get("compute_s", 0.0)) for r in rounds)
    total = sum(float(r.get("round_s", 0.0)) for r in rounds)
    losses_max.sort()
    parity_ok = not problems
    summary = {
        "status": status,
        "error": error,
        "rounds_target": target_rounds,
        "rounds_committed": committed,
        "parity": parity_ok,
        "parity_problems": problems[:20],
        "rounds_checked": len(after),
        "rounds_lost": lost,
        "unrecorded_commits": unrecorded[:20],
        "faults": dict(faults),
        "faults_injected": sum(faults.values()),
        "heals": len(heals),
        "retries": retries,
        "peer_starts_after_chaos": joins,
        "recoveries": len(heals) + retries,
        "bytes_moved": sum(int(r.get("bytes_sent", 0)) for r in rounds) + sum(int(h.get("bytes", 0)) for h in heals),
        "bytes_outer": sum(int(r.get("bytes_sent", 0)) for r in rounds),
        "bytes_state_transfer": sum(int(h.get("bytes", 0)) for h in heals),
        "heal_seconds": [round(float(h.get("seconds", 0.0)), 3) for h in heals],
        "link_bytes": link_bytes or {},
        "compute_utilisation": (compute / total) if total > 0 else None,
        "steps_lost": sum(w["steps_lost"] for w in peers.values()),
        "peers": peers,
        "slowdowns": slowdowns,
        "first_loss_max": losses_max[0][1] if losses_max else None,
        "last_loss_max": losses_max[-1][1] if losses_max else None,
        "final_accuracy": accuracy,
    }
    loss_fell = None
    if len(losses_max) >= 4:  # mean of the first quarter of step records against the last quarter
        q = len(losses_max) // 4
        first = sum(v for _, v in losses_max[:q]) / q
        last = sum(v for _, v in losses_max[-q:]) / q
        loss_fell = last < first
    summary["loss_fell"] = loss_fell
    summary["ok"] = (
        status == "ok"
        and parity_ok
        and lost == 0
        and committed >= target_rounds
        and (loss_fell is True or not require_falling_loss)
    )
    return summary


def _period(peer_dir: str, default: int) -> int:
    """H of a peer: outer.sync_every of its config.json (a DiLoCo dtrain-train peer), else ``default``."""
    try:
        with open(os.path.join(peer_dir, "config.json"), encoding="utf-8") as f:
            outer = json.load(f).get("outer") or {}
        if outer.get("name") == "diloco" and int(outer.get("sync_every") or 0) > 0:
            return int(outer["sync_every"])
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return default


def _slowdowns(run_dir: str, events: List[dict], coord_events: List[dict], inner_steps: int) -> List[dict]:
    """The ``slowdown`` events, each with how soon the coordinator's assignment followed (module doc)."""
    out = []
    for ev in events:
        if ev.get("event") != "slowdown" or not isinstance(ev.get("time"), (int, float)):
            continue
        peer, speed = str(ev.get("peer", "")), float(ev.get("speed") or 1.0)
        plan = [  # (time, round, steps assigned to it for the next round), from every quorum that assigned it
            (float(q["time"]), int(q["round"]), int(q["next_steps"][peer]))
            for q in coord_events
            if q.get("event") == "quorum"
            and isinstance(q.get("time"), (int, float))
            and isinstance(q.get("round"), int)
            and isinstance(q.get("next_steps"), dict)
            and isinstance(q["next_steps"].get(peer), int)
        ]
        before = [n for t, _, n in plan if t <= ev["time"]]
        after = [(r, n) for t, r, n in plan if t > ev["time"]]
        # the assignment it had: the mean of the last (up to) three before it (one is noisy), else H
        ref = (
            sum(before[-3:]) / len(before[-3:])
            if before
            else _period(os.path.join(run_dir, f"peer-{peer}"), inner_steps)
        )
        committed = ev.get("committed_round") if isinstance(ev.get("committed_round"), int) else None
        followed = None
        if ref and committed is not None:
            target = ref * (speed + (1.0 - speed) / 2)
            first = next((r for r, n in after if n <= target), None)
            followed = None if first is None else max(1, first - committed + 1)
        out.append(
            {
                "t": ev.get("t"),
                "peer": peer,
                "speed": ev.get("speed"),
                "committed_round": committed,
                "assigned_before": round(ref, 2) if ref else None,
                "assigned_after": [[r, n] for r, n in after[:6]],
                "followed_after_rounds": followed,
            }
        )
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def peers_table(s: dict) -> str:
    """One row per peer: speed, capacity (its slice), rounds, steps per round, compute utilisation, bytes it
    sent per round, steps lost ('' without steps and utilisation)."""
    peers = s.get("peers") or {}
    if not any(w.get("steps_per_round") or w.get("compute_utilisation") is not None for w in peers.values()):
        return ""  # e.g. model-free peers: no inner steps, no compute time
    rows = []
    for p, w in sorted(peers.items()):
        spr = [n for _, n in w.get("steps_per_round") or []]
        speed = f"{w.get('speed', 1.0):g}" + (f" -> {w['slowed_to']:g}" if w.get("slowed_to") is not None else "")
        steps = f"{w['mean_steps_per_round']:.1f} ({min(spr)}-{max(spr)})" if spr else "-"
        tail = w.get("steps_lost_after_last_round")
        lost = (
            f"{w['steps_lost']} (sat out {w['steps_lost_rounds']}, heals {w['steps_lost_heals']}, "
            f"after last round {'-' if tail is None else tail})"
        )
        fraction = w.get("slice_fraction")
        capacity = "full" if w.get("capacity") is None else f"slice {_pct(fraction)}"
        sent = w.get("bytes_sent_per_round")
        rows.append(
            [
                p,
                speed,
                capacity,
                str(w.get("rounds", 0)),
                steps,
                _pct(w.get("compute_utilisation")),
                "-" if sent is None else f"{human(sent)}B",
                lost,
            ]
        )
    headers = [
        "peer",
        "speed",
        "capacity",
        "rounds",
        "steps/round (min-max)",
        "compute util",
        "sent/round",
        "steps lost",
    ]
    return format_table(headers, rows, "per peer")


def summary_table(s: dict) -> str:
    acc = s.get("final_accuracy") or {}
    util = s.get("compute_utilisation")
    rows = [
        ["status", s["status"] + (f" ({s['error']})" if s.get("error") else "")],
        ["rounds committed", f"{s['rounds_committed']} of {s['rounds_target']}"],
        ["parity", ("ok" if s["parity"] else "FAILED") + f" ({s['rounds_checked']} rounds checked)"],
        ["rounds lost", str(s["rounds_lost"])],
        ["faults injected", f"{s['faults_injected']} " + (json.dumps(s["faults"]) if s["faults"] else "")],
        ["recoveries", f"{s['recoveries']} ({s['heals']} heals, {s['retries']} round retries)"],
        ["bytes moved", f"outer {human(s['bytes_outer'])}B, state transfer {human(s['bytes_state_transfer'])}B"],
        ["compute utilisation", "-" if util is None else f"{100 * util:.1f}%"],
        ["final test acc (max / min)", " / ".join(f"{100 * acc[k]:.2f}%" if k in acc else "-" for k in ("max", "min"))],
    ]
    if s.get("loss_fell") is not None:
        rows.append(["loss of the largest subnet", "falling" if s["loss_fell"] else "NOT falling"])
    if any(w.get("steps_per_round") for w in (s.get("peers") or {}).values()):
        rows.append(["steps lost", str(s.get("steps_lost", 0))])
    for sd in s.get("slowdowns") or []:
        k = sd.get("followed_after_rounds")
        rows.append(
            [
                "slowdown",
                f"{sd['peer']} to {sd['speed']:g} at {sd['t']:g}s (round {sd.get('committed_round')}): "
                + ("the assignment did not follow" if k is None else f"the assignment followed within {k} round(s)"),
            ]
        )
    if s.get("parity_problems"):
        rows += [["parity problem", p] for p in s["parity_problems"][:5]]
    table = format_table(["dtrain-sim", "value"], rows, "simulation summary")
    per_peer = peers_table(s)
    return table + ("\n\n" + per_peer if per_peer else "")
