"""Read a simulation's run dir and judge it: parity, rounds lost, faults, recoveries, bytes, accuracy.

Parity (the project's promise): every peer that completed round r reports the
same state hash for S_{r+1} (``round`` records), every heal to round r
adopted that same S_r, and the coordinator's commit of round r names the
hash the peers held for S_r. A round is **lost** when the coordinator
committed it but no peer recorded applying it (a round record, or a heal to
the state after it), or when the coordinator's committed round went
backwards across a restart.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List

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
) -> dict:
    after: Dict[int, Dict[str, str]] = defaultdict(dict)  # round r -> peer -> hash of S_{r+1}
    heals: List[dict] = []
    rounds = []
    losses_max: List[float] = []
    accuracy: Dict[str, float] = {}
    for peer, d in _peer_dirs(run_dir).items():
        for rec in read_jsonl(os.path.join(d, "metrics.jsonl")):
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
    if s.get("parity_problems"):
        rows += [["parity problem", p] for p in s["parity_problems"][:5]]
    return format_table(["dtrain-sim", "value"], rows, "simulation summary")
