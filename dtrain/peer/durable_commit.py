"""Durable commit: S_{r+1} is on disk before this peer votes on round r.

A peer that dies after its vote but before its checkpoint would otherwise
lose a round the others committed. So, before voting:

    persist(nxt, quorum_id, base_hash)   next_global.pt <- S_{r+1}, the quorum id, H(S_r)

and at the next start, :func:`recover` adopts that S_{r+1} when it is newer
than the checkpoint and the coordinator's commit history shows round r
committed with that very quorum from that very S_r (the crash came after the
commit); otherwise it is dropped and the checkpoint stands. The file is
written atomically; a torn or foreign file is ignored.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable, Optional

from ..checkpoint import load_checkpoint, save_checkpoint
from ..control.client import ControlError
from ..outer.global_state import GlobalState

log = logging.getLogger("dtrain")


class DurableCommit:
    def __init__(self, path: str, schema: str):
        self.path, self.schema = path, schema

    def persist(self, nxt: GlobalState, quorum_id: int, base_hash: str) -> None:
        """Write S_{r+1} before the vote on round r (OSError: this peer votes not ok)."""
        save_checkpoint(
            self.path,
            {
                "round": nxt.round,
                "tensors": dict(nxt.tensors),
                "state_hash": nxt.hash(),
                "quorum_id": int(quorum_id),
                "from_hash": base_hash,
                "schema": self.schema,
            },
        )

    def recover(self, state: GlobalState, commits: Callable[[], Iterable], wait_s: float) -> Optional[GlobalState]:
        """The S_{r+1} written before a vote, when round r committed with that quorum; else None.

        ``commits()`` returns the coordinator's commit history (records with round, quorum_id and
        state_hash); it is retried for ``wait_s`` while the coordinator cannot answer."""
        if not os.path.exists(self.path):
            return None
        try:
            saved = load_checkpoint(self.path)
            rnd, qid, base = int(saved["round"]), int(saved["quorum_id"]), str(saved["from_hash"])
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is ignored, the checkpoint stands
            log.warning("ignoring %s: %s", self.path, e)
            return None
        if (
            saved.get("schema") != self.schema
            or rnd <= state.round
            or sorted(saved.get("tensors", {})) != sorted(state.tensors)
        ):
            return None
        history, deadline = None, time.monotonic() + wait_s
        while history is None:
            try:
                history = commits()
            except ControlError as e:
                if time.monotonic() > deadline:
                    log.warning("cannot check whether round %d committed (%s): using the checkpoint", rnd - 1, e)
                    return None
                time.sleep(0.5)  # e.g. the coordinator is restarting with the cluster
        if not any(c.round == rnd - 1 and c.quorum_id == qid and c.state_hash == base for c in history):
            log.info(
                "S_%d written before a vote is not the committed one: using the checkpoint (S_%d)", rnd, state.round
            )
            return None
        cand = GlobalState([(k, saved["tensors"][k]) for k in state.tensors], round=rnd)
        if cand.hash() != saved.get("state_hash"):
            log.warning("ignoring %s: its tensors do not match its state hash", self.path)
            return None
        log.info(
            "round %d committed after this peer's vote: continuing from S_%d written before the vote "
            "(checkpoint holds S_%d)",
            rnd - 1,
            rnd,
            state.round,
        )
        return cand
