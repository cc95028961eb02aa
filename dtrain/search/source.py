"""Where a trained supernet comes from: a checkpoint file, a run dir, or a dtrain-sim run.

``checkpoint=`` may name

- a checkpoint file (``.../checkpoints/latest.pt``),
- a ``dtrain-train`` run dir (its ``checkpoints/latest.pt``), or
- a ``dtrain-sim`` run dir: the coordinator-confirmed latest global state. The
  coordinator's ``committed_round`` c counts the committed rounds, so S_c is the
  newest state a commit produced. Among the peers' checkpoints, those holding
  S_r with r <= c qualify; a checkpoint whose round is in the coordinator's
  commit history (which records the hash of S_r for each committed round r)
  must carry that hash.
  The highest round wins, and among peers at that round the hash most of them
  hold (ties: the first peer id).

DiLoCo checkpoints hold the global parameters beside the local ones; the global
ones are loaded (they are the run's result). The model config comes from the
checkpoint itself, the data config from the run's ``config.json`` unless one is
given.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import Any, Optional, Tuple

from ..checkpoint import load_checkpoint
from ..config import ConfigError, data_config_from, model_config_from
from ..outer.flat_params import FlatLayout
from ..outer.global_state import GlobalState
from ..supernet import build_supernet


@dataclasses.dataclass
class Source:
    path: str  # the checkpoint file
    model: Any  # the supernet with the checkpoint's weights (eval mode)
    model_cfg: Any
    data_cfg: Any
    seed: int  # the training run's seed (fixes the calibration set)
    info: dict  # peer, step, round, state hash, how it was chosen


def _load(path: str) -> dict:
    try:
        return load_checkpoint(path)
    except Exception as ex:  # truncated / not a torch file / unpicklable object
        raise ConfigError(
            f"checkpoint={path!r} cannot be read as a dtrain checkpoint: "
            f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
        ) from ex


def _global_hash(outer: dict) -> str:
    return GlobalState(list(outer["tensors"].items()), round=int(outer["round"])).hash()


def _pick_from_sim(run_dir: str) -> Tuple[str, dict]:
    state_path = os.path.join(run_dir, "coordinator", "state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as ex:
        raise ConfigError(
            f"checkpoint={run_dir!r} looks like a dtrain-sim run but {state_path} cannot be "
            f"read ({ex}): give one peer's checkpoint file instead"
        ) from ex
    committed = int(state.get("committed_round", -1))
    history = {int(h["round"]): h["state_hash"] for h in state.get("history", [])}
    found, refused = [], []
    for ckpt in sorted(glob.glob(os.path.join(run_dir, "peer-*", "checkpoints", "latest.pt"))):
        peer = os.path.basename(os.path.dirname(os.path.dirname(ckpt)))[len("peer-") :]
        outer = _load(ckpt).get("outer")
        if not outer or "theta" not in outer.get("tensors", {}):
            refused.append(f"{peer}: no global state")
            continue
        rnd, h = int(outer["round"]), _global_hash(outer)
        if rnd > committed:
            refused.append(f"{peer}: S_{rnd} is past the coordinator's {committed} committed rounds")
        elif rnd in history and history[rnd] != h:
            refused.append(f"{peer}: round {rnd} hash differs from the coordinator's")
        else:
            found.append((rnd, h, peer, ckpt))
    if not found:
        why = "; ".join(refused) or "no peer-*/checkpoints/latest.pt"
        raise ConfigError(f"checkpoint={run_dir!r}: no peer checkpoint is confirmed by the coordinator ({why})")
    top = max(r for r, *_ in found)
    at_top = [f for f in found if f[0] == top]
    votes = collections.Counter(h for _, h, _, _ in at_top)
    best_hash = max(votes, key=lambda h: (votes[h], -min(i for i, f in enumerate(at_top) if f[1] == h)))
    rnd, h, peer, ckpt = next(f for f in at_top if f[1] == best_hash)
    how = "in the coordinator's commit history" if rnd in history else f"produced by committed round {rnd - 1}"
    return ckpt, {
        "peer": peer,
        "round": rnd,
        "state_hash": h,
        "confirmed": how,
        "peers_agreeing": votes[best_hash],
        "committed_round": committed,
    }


def resolve_checkpoint(path: str) -> Tuple[str, dict]:
    """(checkpoint file, how it was chosen) for a file, a run dir or a dtrain-sim run dir."""
    if not path:
        raise ConfigError("checkpoint is not set: give checkpoint=PATH (a .pt file, a run dir or a dtrain-sim run dir)")
    if os.path.isfile(path):
        return path, {"confirmed": "given file"}
    if not os.path.isdir(path):
        raise ConfigError(
            f"checkpoint={path!r} does not exist: give a checkpoint file, a dtrain-train run dir "
            "or a dtrain-sim run dir"
        )
    if os.path.isdir(os.path.join(path, "coordinator")) and glob.glob(os.path.join(path, "peer-*")):
        return _pick_from_sim(path)
    ckpt = os.path.join(path, "checkpoints", "latest.pt")
    if os.path.isfile(ckpt):
        return ckpt, {"confirmed": "run dir's latest checkpoint"}
    raise ConfigError(f"checkpoint={path!r} holds no checkpoints/latest.pt and is not a dtrain-sim run dir")


def _run_config(ckpt: str) -> Optional[dict]:
    cfg_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f)


def load_source(path: str, device="cpu", data: Any = None) -> Source:
    """The supernet of ``path`` (see the module docstring), on ``device``, in eval mode."""
    ckpt, info = resolve_checkpoint(path)
    state = _load(ckpt)
    if "model" not in state or "model_config" not in state:
        raise ConfigError(f"checkpoint={ckpt!r} is not a dtrain training checkpoint (no model / model_config)")
    model_cfg = model_config_from(json.loads(state["model_config"]))
    model = build_supernet(model_cfg)
    model.load_state_dict(state["model"])
    outer = state.get("outer") or {}
    tensors = outer.get("tensors", {})
    if "theta" in tensors and "velocity" in tensors:  # DiLoCo: the global parameters are the result
        FlatLayout(model).load(model, tensors["theta"])
        info.setdefault("round", int(outer["round"]))
        info.setdefault("state_hash", _global_hash(outer))
        info["weights"] = "global (DiLoCo)"
    else:
        info["weights"] = "local"
    run_cfg = _run_config(ckpt)
    if data is None:
        if run_cfg is None or "data" not in run_cfg:
            raise ConfigError(
                f"no config.json beside {ckpt!r} says which data it was trained on: "
                "give data=... (digits, text, cifar10, synthetic)"
            )
        data = run_cfg["data"]
    data_cfg = data_config_from(data)
    info.update(
        {"checkpoint": os.path.abspath(ckpt), "step": int(state.get("step", 0)), "peer_id": state.get("peer_id", "")}
    )
    model.to(device).eval()
    seed = int(run_cfg.get("seed", 0)) if run_cfg else 0
    return Source(ckpt, model, model_cfg, data_cfg, seed, info)
