"""``dtrain-sim``'s engine: start a coordinator and peers on loopback, run the chaos schedule, stop everything.

    Simulation(cfg).run() -> summary dict (also ${run_dir}/summary.json)

Peers are ``dtrain-train`` processes (a torchrun job when the peer has several
ranks) or, for fast protocol tests, model-free ``dtrain.sim.model_free_peer``
processes. Each peer's gRPC traffic goes through its egress proxy in the WAN
emulator (``grpc_proxy``), so every peer-to-peer and peer-to-coordinator path
is an emulated link. The run ends when the coordinator has committed
``sim.rounds`` rounds and every peer has exited; it fails after
``sim.timeout_s`` or when every peer is gone. Every action goes to
``${run_dir}/events.jsonl`` as ``{"t": seconds since start, "time": unix,
"event": ..., ...}``.

Emulated slow hardware: peer i gets ``emulated_speed=sim.speed[i mod len]``
(a ``dtrain-train`` peer sleeps so that its every inner step lasts 1/speed of
its natural time; a model-free peer's ``--step-s`` is divided by it). A
``chaos.slowdown_at_s`` action slows a running peer from outside instead
(:mod:`dtrain.sim.throttle`: SIGSTOP / SIGCONT in a 50 ms duty cycle) to
``chaos.slowdown`` of its speed until the run ends; the slowdown stays with
the peer id, so a restarted process of that peer is throttled again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from .chaos import Action, build_schedule, pick
from .processes import Proc, free_port, spawn, venv_script, wait_for_line
from .summary import summarize
from .throttle import Throttle
from .wan import LinkSpec, WanEmulator

log = logging.getLogger("dtrain.sim")

COORD = "coordinator"
_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP}


class Terminated(Exception):
    """dtrain-sim got SIGTERM: stop every process it started, judge the run, exit (like Ctrl-C)."""


def _terminate_like_interrupt():
    """SIGTERM raises :class:`Terminated` in the main thread (the run's shutdown then stops every coordinator
    and peer the simulation started, each in its own session); returns what restores the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, old)


class SimError(RuntimeError):
    """The simulation could not run to its end (timeout, every peer gone, a process that cannot start)."""


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


class Simulation:
    def __init__(self, cfg):
        self.cfg, self.sim, self.chaos = cfg, cfg.sim, cfg.chaos
        self.run_dir = os.path.abspath(cfg.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.coord_dir = os.path.join(self.run_dir, COORD)
        self.t0 = time.monotonic()
        self.events = open(os.path.join(self.run_dir, "events.jsonl"), "a", encoding="utf-8")
        self.peers: Dict[str, Proc] = {}
        self.peer_index: Dict[str, int] = {}
        self.exited: Dict[str, int] = {}  # peer -> exit status, for peers not running now
        self.coordinator: Optional[Proc] = None
        self.coord_port = 0
        self.committed = 0
        self.max_committed = 0
        self.wan: Optional[WanEmulator] = None
        self.proxy_url: Dict[str, str] = {}
        self.pending: List[Tuple[float, str, str]] = []  # (due, action, peer or "")
        self.lost_by_restart = 0
        self.slowed: Dict[str, float] = {}  # peer -> the speed a chaos slowdown holds it at
        self.throttles: Dict[str, Throttle] = {}  # peer -> the running duty cycle of its process
        self.duration_reached = False
        self._last_scan = 0.0

    # ------------------------------------------------------------------ bookkeeping
    def event(self, kind: str, **fields) -> None:
        rec = {"t": round(time.monotonic() - self.t0, 3), "time": round(time.time(), 3), "event": kind, **fields}
        self.events.write(json.dumps(rec) + "\n")
        self.events.flush()
        log.info("%s", " ".join([f"[{rec['t']:7.1f}s]", kind] + [f"{k}={v}" for k, v in fields.items()]))

    def speed_of(self, index: int) -> float:
        return float(self.sim.speed[index % len(self.sim.speed)])

    def capacity_of(self, index: int) -> dict:
        """Peer ``index``'s capacity overrides ({} for the whole supernet)."""
        entry = self.sim.capacity[index % len(self.sim.capacity)]
        return {k: v for k, v in dict(entry or {}).items() if v is not None}

    def region_of(self, index: int) -> str:
        r = self.sim.regions
        return r[index % len(r)] if r else f"node{index}"

    def coord_region(self) -> str:
        if self.sim.coordinator_region:
            return self.sim.coordinator_region
        return self.sim.regions[0] if self.sim.regions else COORD

    def link_of(self, a: str, b: str) -> LinkSpec:
        w = self.cfg.wan
        if a == b:
            local = w.local
            return LinkSpec(local.latency_ms, local.jitter_ms, local.bandwidth_mbit)
        pair = w.pairs.get(f"{a}-{b}") or w.pairs.get(f"{b}-{a}")
        if pair is not None:
            return LinkSpec(*(float(x) for x in pair))
        return LinkSpec(w.latency_ms, w.jitter_ms, w.bandwidth_mbit)

    def read_committed(self) -> int:
        try:
            with open(os.path.join(self.coord_dir, "state.json"), encoding="utf-8") as f:
                r = int(json.load(f)["committed_round"])
        except (OSError, ValueError, KeyError):
            return self.committed
        if r < self.max_committed:
            self.lost_by_restart = max(self.lost_by_restart, self.max_committed - r)
        self.committed, self.max_committed = r, max(self.max_committed, r)
        return r

    # ------------------------------------------------------------------ processes
    def start_coordinator(self) -> None:
        port = self.coord_port or free_port()
        cmd = [
            venv_script("dtrain-coordinator"),
            f"port={port}",
            f"state_dir={self.coord_dir}",
            *self.sim.coordinator_args,
        ]
        # the simulation's peers share one token: a cluster secret in the caller's environment would switch
        # the coordinator to per-peer identity tokens and refuse them
        env = {k: v for k, v in os.environ.items() if k != "DTRAIN_SECRET"}
        proc = spawn(COORD, cmd, self.run_dir, env={**env, "PYTHONUNBUFFERED": "1"})
        line = wait_for_line(proc.log_path, "coordinator listening on", proc, 60.0)
        self.coord_port = int(line.rsplit(":", 1)[1])
        self.coordinator = proc
        if self.wan is not None:
            self.wan.register(COORD, self.coord_address())
        self.event("coordinator_start", pid=proc.pid, address=self.coord_address())

    def coord_address(self) -> str:
        return f"127.0.0.1:{self.coord_port}"

    def peer_env(self, peer_id: str) -> Dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        for k in ("no_proxy", "NO_PROXY", "no_grpc_proxy", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(k, None)
        if peer_id in self.proxy_url:
            env["grpc_proxy"] = self.proxy_url[peer_id]
        return env

    def peer_command(self, peer_id: str, index: int, port: int) -> List[str]:
        s = self.sim
        peer_dir = os.path.join(self.run_dir, f"peer-{peer_id}")
        os.makedirs(peer_dir, exist_ok=True)
        if s.peer == "model_free":
            return [
                sys.executable,
                "-m",
                "dtrain.sim.model_free_peer",
                "--coordinator",
                self.coord_address(),
                "--peer-id",
                peer_id,
                "--rounds",
                str(s.rounds),
                "--out",
                os.path.join(peer_dir, "metrics.jsonl"),
                "--numel",
                str(s.numel),
                "--step-s",
                str(s.step_s / self.speed_of(index)),
                "--port",
                str(port),
                "--join-timeout",
                "120",
                "--sync-timeout-s",
                "120",
                "--deadline-s",
                "20",
                "--token",
                os.environ.get("DTRAIN_TOKEN", ""),
            ]
        ours = {
            "peer_id": peer_id,
            "run_dir": peer_dir,
            "control.coordinator": self.coord_address(),
            "control.port": str(port),
            "control.region": self.region_of(index),
            "outer.sync_every": str(s.inner_steps),
            "steps": str(s.rounds * s.inner_steps),
            "resume": "true",
            "threads": "1",
            "logger.progress": "off",
        }
        if self.speed_of(index) != 1.0:
            ours["emulated_speed"] = repr(self.speed_of(index))
        for key, value in sorted(self.capacity_of(index).items()):
            ours[f"capacity.{key}"] = str(value)
        user = list(s.peer_args) + list(s.peer_overrides[index % len(s.peer_overrides)])
        user_keys = {_override_key(a) for a in user}
        args = [f"{k}={v}" for k, v in ours.items() if k not in user_keys]
        if "outer" not in user_keys:
            args.insert(0, "outer=diloco")
        nproc = s.nproc_per_peer[index % len(s.nproc_per_peer)]
        if nproc == 1:
            return [venv_script("dtrain-train"), *args, *user]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "dtrain.cli.train",
            *args,
            *user,
        ]

    def start_peer(self, peer_id: str, reason: str) -> None:
        index = self.peer_index.setdefault(peer_id, len(self.peer_index))
        port = free_port()
        if self.wan is not None and peer_id not in self.proxy_url:
            self.proxy_url[peer_id] = self.wan.add_node(peer_id, self.region_of(index))
        if self.wan is not None:
            self.wan.register(peer_id, f"127.0.0.1:{port}")
        cmd = self.peer_command(peer_id, index, port)
        proc = spawn(
            f"peer-{peer_id}",
            cmd,
            os.path.join(self.run_dir, f"peer-{peer_id}"),
            env=self.peer_env(peer_id),
            term_children="torch.distributed.run" in cmd,
        )
        self.peers[peer_id] = proc
        self.exited.pop(peer_id, None)
        self.event(
            "peer_start",
            peer=peer_id,
            pid=proc.pid,
            reason=reason,
            region=self.region_of(index),
            nproc=self.sim.nproc_per_peer[index % len(self.sim.nproc_per_peer)],
            port=port,
            speed=self.speed_of(index),
        )
        self.throttle(peer_id)

    def live_peers(self, include_stopped: bool = False) -> List[str]:
        return sorted(p for p, pr in self.peers.items() if pr.alive() and (include_stopped or not pr.stopped))

    def reap(self) -> None:
        scan = time.monotonic() - self._last_scan > 1.0 and any(n > 1 for n in self.sim.nproc_per_peer)
        if scan:
            self._last_scan = time.monotonic()
        for pid, proc in list(self.peers.items()):
            if scan:
                proc.remember_tree()
            rc = proc.popen.poll()
            if rc is not None:
                self.unthrottle(pid)
                proc.kill_group()
                del self.peers[pid]
                self.exited[pid] = rc
                self.event("peer_exit", peer=pid, status=rc)

    # ------------------------------------------------------------------ chaos
    def fire(self, a: Action) -> None:
        rng = a.rng(self.chaos.seed)
        c = self.chaos
        if a.kind == "kill":
            live = self.live_peers()
            if len(live) <= c.min_alive:
                self.event("kill_skipped", reason=f"{len(live)} live peer(s), chaos.min_alive={c.min_alive}")
                return
            victim = pick(rng, live)
            self.unthrottle(victim)
            self.peers[victim].signal(_SIGNALS[c.signal])
            self.event("kill", peer=victim, signal=c.signal, committed_round=self.committed)
            if c.restart_after_s is not None:
                self.pending.append(
                    (time.monotonic() + c.restart_after_s, "cont" if c.signal == "STOP" else "restart", victim)
                )
        elif a.kind == "join":
            new = f"p{len(self.peer_index)}"
            self.start_peer(new, "chaos join")
        elif a.kind in ("coordinator_restart", "cluster_restart"):
            before = self.read_committed()
            self.coordinator.signal(signal.SIGKILL)
            self.coordinator.popen.wait(10)
            victims = []
            if a.kind == "cluster_restart":
                victims = self.live_peers(include_stopped=True)
                for p in victims:
                    self.unthrottle(p)
                    self.peers[p].signal(signal.SIGKILL)
                for p in victims:
                    self.peers[p].popen.wait(10)
                    self.peers[p].kill_group()
                    del self.peers[p]
                    self.exited[p] = -9
                self.pending = [x for x in self.pending if x[1] != "cont"]
            self.event(a.kind, committed_round=before, peers_killed=victims)
            due = time.monotonic() + c.coordinator_down_s
            self.pending.append((due, "coordinator", ""))
            for p in victims:
                self.pending.append((due + 0.01, "restart", p))
        elif a.kind in ("link_reset", "link_stall"):
            nodes = self.live_peers() + [COORD]
            if len(nodes) < 2 or self.wan is None:
                return
            x = pick(rng, nodes)
            y = pick(rng, [n for n in nodes if n != x])
            if a.kind == "link_reset":
                n = self.wan.reset(x, y)
                self.event("link_reset", a=x, b=y, connections=n)
            else:
                self.wan.stall(x, y, self.cfg.wan.stall_s)
                self.event("link_stall", a=x, b=y, seconds=self.cfg.wan.stall_s)
        elif a.kind == "slowdown":
            live = self.live_peers()
            if not live:
                self.event("slowdown_skipped", planned=a.peer, reason="no running peer")
                return
            victim = a.peer if a.peer in live else pick(rng, live)
            self.slowed[victim] = c.slowdown
            self.unthrottle(victim)
            self.throttle(victim)
            self.event("slowdown", peer=victim, speed=c.slowdown, planned=a.peer, committed_round=self.committed)

    def throttle(self, peer: str) -> None:
        """Run ``peer``'s process at the speed a slowdown holds it at (no-op when none does)."""
        proc, speed = self.peers.get(peer), self.slowed.get(peer)
        if speed is None or proc is None or not proc.alive() or peer in self.throttles:
            return
        budget = max(1.0, self.sim.timeout_s + self.sim.finish_grace_s - (time.monotonic() - self.t0))
        self.throttles[peer] = Throttle(proc, speed, max_s=budget).start()

    def unthrottle(self, peer: str) -> None:
        """Stop ``peer``'s duty cycle (its process is left continued)."""
        t = self.throttles.pop(peer, None)
        if t is not None:
            t.stop()
            share = t.stopped_share()
            self.event(
                "throttle_end",
                peer=peer,
                seconds=round(t.elapsed_s(), 3),
                cycles=t.cycles,
                stopped_share=None if share is None else round(share, 3),
            )

    def run_pending(self, now: float, finished: bool) -> None:
        due = sorted(x for x in self.pending if x[0] <= now)
        self.pending = [x for x in self.pending if x[0] > now]
        for _, what, peer in due:
            if what == "coordinator":
                self.start_coordinator()
            elif what == "cont" and peer in self.peers:
                self.peers[peer].signal(signal.SIGCONT)
                self.event("resume_stopped", peer=peer)
                self.throttle(peer)
            elif what == "restart" and not finished:
                if peer in self.peers and self.peers[peer].alive():
                    continue
                self.start_peer(peer, "restart")

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        s, cfg = self.sim, self.cfg
        status, error = "ok", ""
        self.event(
            "sim_start",
            peers=s.peers,
            rounds=s.rounds,
            resume=cfg.resume,
            peer_kind=s.peer,
            wan=cfg.wan.enabled,
            speed=list(s.speed),
        )
        schedule = build_schedule(self.chaos, cfg.wan, s.timeout_s, [f"p{i}" for i in range(s.peers)])
        restore = _terminate_like_interrupt()
        try:
            if cfg.wan.enabled:
                self.wan = WanEmulator(
                    lambda a, b: self.link_of(a, b), seed=self.chaos.seed, buffer_bytes=int(cfg.wan.buffer_mb * 2**20)
                )
                self.wan.add_node(COORD, self.coord_region())
            self.start_coordinator()
            ids = [f"p{i}" for i in range(s.peers)]
            if cfg.resume:  # every peer the run has seen before, too
                ids += sorted(d[5:] for d in os.listdir(self.run_dir) if d.startswith("peer-") and d[5:] not in ids)
            for pid in ids:
                self.start_peer(pid, "resume" if cfg.resume else "start")
            chaos_t0, nxt, start_committed, finished_at = None, 0, self.read_committed(), None
            while True:
                now = time.monotonic()
                committed = self.read_committed()
                self.reap()
                if s.duration_s and now - self.t0 >= s.duration_s and not self.duration_reached:
                    self.duration_reached = True
                    self.event("duration_reached", committed_round=committed, peers=sorted(self.peers))
                    for p in sorted(self.peers):  # every peer leaves gracefully (Leave, checkpoint, exit 0)
                        if self.peers[p].stopped:
                            self.peers[p].signal(signal.SIGCONT)
                        self.peers[p].signal(signal.SIGTERM)
                finished = committed >= s.rounds or self.duration_reached
                if chaos_t0 is None and committed > start_committed:
                    chaos_t0 = now
                    self.event("chaos_clock_start", committed_round=committed, actions=len(schedule))
                if finished:
                    finished_at = finished_at or now
                    if now - finished_at > s.finish_grace_s and self.peers:
                        for p in sorted(self.peers):  # e.g. a peer still healing when every donor left
                            self.event("stop_straggler", peer=p, waited_s=round(now - finished_at, 1))
                            self.unthrottle(p)
                            self.peers[p].stop(grace_s=10.0)
                        self.reap()
                    for p in self.live_peers(include_stopped=True):
                        if self.peers[p].stopped:
                            self.peers[p].signal(signal.SIGCONT)
                            self.event("resume_stopped", peer=p, reason="run finished")
                    if not self.peers and not any(x[1] == "coordinator" for x in self.pending):
                        break
                elif not self.peers and not self.pending and not any(a.kind in ("join",) for a in schedule[nxt:]):
                    raise SimError(
                        f"every peer is gone at committed round {committed} of {s.rounds} "
                        "and none is due to restart or join"
                    )
                if now - self.t0 > s.timeout_s and not self.duration_reached:
                    raise SimError(
                        f"the run did not finish within sim.timeout_s={s.timeout_s:g}s "
                        f"(committed round {committed} of {s.rounds})"
                    )
                while (
                    chaos_t0 is not None and not finished and nxt < len(schedule) and now - chaos_t0 >= schedule[nxt].t
                ):
                    self.fire(schedule[nxt])
                    nxt += 1
                self.run_pending(now, finished)
                time.sleep(0.1)
        except KeyboardInterrupt:
            status, error = "interrupted", "Ctrl-C"
        except Terminated:
            status, error = "interrupted", "SIGTERM"
        except (SimError, RuntimeError, OSError) as e:
            status, error = "failed", str(e)
        finally:
            self.shutdown()
            restore()
        self.event("sim_end", status=status, error=error, committed_round=self.committed)
        summary = summarize(
            self.run_dir,
            1 if s.duration_s else s.rounds,
            status=status,
            error=error,
            require_falling_loss=bool(s.duration_s) and s.peer == "train",
            lost_by_restart=self.lost_by_restart,
            link_bytes=self.wan.link_bytes() if self.wan is not None else {},
            inner_steps=s.inner_steps if s.peer == "train" else 0,
        )
        with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        self.events.close()
        return summary

    def shutdown(self) -> None:
        for pid in list(self.throttles):
            self.unthrottle(pid)
        for pid, proc in list(self.peers.items()):
            rc = proc.stop(grace_s=15.0)
            self.exited[pid] = rc if rc is not None else -9
        if self.coordinator is not None:
            self.coordinator.stop(grace_s=5.0)
        if self.wan is not None:
            self.wan.close()
