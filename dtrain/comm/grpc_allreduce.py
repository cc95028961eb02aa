"""The ``grpc`` outer collective: a reduce-scatter + all-gather mean over ``Peer.PushShard``.

Math. Member m (ring position m = 0..k-1) holds x_m, a flat float32 tensor of
N values. The index range is cut into k contiguous shards; shard i has
``N // k + (1 if i < N % k else 0)`` values (sizes differ by at most one) and
is **owned** by member i. With E/D the codec's encode/decode:

  phase 1 (reduce-scatter): every member m sends E(x_m[shard i]) to owner i,
      for i != m. Owner i computes, in float32 and in ring order,
          s_i = ((0 + D(E(x_0[i]))) + D(E(x_1[i]))) + ... + D(E(x_{k-1}[i]))
          y_i = E(s_i / k)
      (with ``group.weights``: s_i adds fl(w_j * D(E(x_j[i]))), skipping
      w_j = 0, and y_i = E(s_i / sum(w)); see ``dtrain.outer.weighting``)
      Its own slice also goes through D(E(.)) (our choice; only the owner
      uses it, so parity holds either way): every contribution is quantised
      the same way wherever it is owned, and error feedback, which assumes the
      codec sees every value, stays right.
  phase 2 (all-gather): owner i sends the bytes y_i to every other member.
      EVERY member, owner included, sets result[shard i] = D(y_i).

Why every member ends with the same bits: result[shard i] is a pure function
(D, deterministic) of the byte string y_i, and all members decode the very
same y_i: the owner encoded it once and sent those bytes. The order of the
float32 sum is fixed (ring order), so y_i is also reproducible from the
inputs, independent of arrival order.

Cost. Two quantisation steps per value (E before the sum, E of the mean).
Member m sends (k-1) slices of about N/k values and (k-1) copies of its
mean shard, and receives as much:
  bytes sent = bytes received ~= 2 (k-1)/k * N * bytes-per-value
plus the codec's scales and the per-chunk header. ``bytes_sent`` /
``bytes_recv`` count every ShardChunk as its serialised size + 5 (the gRPC
frame); HTTP/2 and TCP/TLS framing are not counted.

Slices (``group.masks``, see ``dtrain.outer.masking`` for the formula and the
shard rule). Member m's ``flat`` is then its compact payload (c_m values; the
full N when its mask is None) and only its slice travels:

  shards: contiguous coordinate ranges, member i's holding a number of the
      M covered coordinates proportional to q_i = c_i / ((k-1) M - c_i)
      (``shard_layout``), which makes every member's bytes sent about
      proportional to its c_m;
  phase 1: member m sends owner i the codec blocks of its compact payload that
      hold its coordinates of shard i (E of a slice of ``flat``: the same
      blocks as E(flat)); nothing when it covers none there. Owner i decodes
      each, keeps the coordinates in shard i, adds fl(w_j * value) over j in
      ring order at the coordinates j covers (``masked_weighted_mean``),
      divides each coordinate by its weight sum W, and encodes
      y_i = E(the means of shard i's covered coordinates) alone;
  phase 2: y_i to everyone, as above; every member places D(y_i) at shard i's
      covered coordinates and 0.0 elsewhere, and returns ``covered``.

Everything a receiver expects (slot sizes, where values go) follows from the
masks and weights, which every member holds alike. A member whose compact
payload is not c_m long cannot split it: it sends every other member a phase-1
slot one value too long, which they refuse naming it (as they would a short or
long slot; gloo's status byte does the same), and raises naming itself. Bytes:
member m sends about c_m (1 + 1 / sum_i q_i) encoded values; all full:
2 (k-1)/k N, as above. Masks all None (or none): the unmasked collective above,
bit for bit. Members must hold the same masks (the quorum view's slice specs):
a member with other masks is named only where its slot sizes differ from what
the others expect; otherwise the next round's state hash shows the divergence.

Transport. An encoded shard is cut into chunks of at most ``chunk_bytes``
(default 1 MiB, at most 4 MiB) spread over ``streams`` PushShard streams per
destination; each stream runs on its own channel, i.e. its own TCP
connection (several connections fill a long fat pipe better than one
congestion window). All destinations are pushed at once; gRPC consumes each
stream's request generator on its own thread. Channels stay open across
calls (keyed by address and stream lane). Chunks are framed by
``shard_wire`` straight from the encoded shard (for fp32, the tensor's own
memory): one copy into the message instead of four through protobuf; the
receiver keeps each payload a view of the received bytes until it lands in
its slot. The token travels as ``authorization: Bearer`` metadata, TLS comes
from ``make_channel``.

Failure. Every RPC's deadline is the collective's deadline; waits end there
too, so ``allreduce_mean`` returns or raises within ``deadline_s`` plus a few
milliseconds of clean-up, whatever the other members do. A missing, dead or
stopped member leaves the others without its slice or its mean shard: they
raise CollectiveError at the deadline, or sooner when a push to it fails
(refused connection at once; a FAILED_PRECONDITION refusal, meaning the
member's collective is already over, after ``culprit_grace_s`` (1 s, never
past the deadline), so that an invalid payload already on its way here is
still checked and its sender named). A payload the inbox refuses (see
``shard_inbox``) raises CollectiveError naming the sender as ``culprit``. A
member returns only after every push it made was acknowledged and every
shard it needs was decoded; nothing partial is ever returned. (A member may
still succeed while another fails late, e.g. on decoding the last shard it
receives; the coordinator's commit vote settles that.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import grpc
import torch

from ..outer.masking import ShardLayout, check_masks, masked_weighted_mean, shard_layout
from ..outer.weighting import weighted_sum_into
from ..v1 import dtrain_pb2 as pb
from ..wire.auth import auth_metadata, make_channel
from ..wire.codec import Codec, CodecError
from ..wire.snapshot import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES
from .collective import Collective, CollectiveError, CollectiveResult, Group
from .shard_inbox import Key, ShardInbox
from .shard_wire import GRPC_FRAME_BYTES, frame

log = logging.getLogger("dtrain.comm")

PUSH_SHARD = "/" + pb.DESCRIPTOR.services_by_name["Peer"].full_name + "/PushShard"
DEFAULT_STREAMS = 2
MAX_STREAMS = 16
MAX_CHANNELS = 256
DEFAULT_CULPRIT_GRACE_S = 1.0


def shard_bounds(numel: int, k: int, align: int = 1) -> List[Tuple[int, int]]:
    """(start, length) of the k contiguous shards of ``numel`` values.

    Shards start at multiples of ``align`` (the codec's block size), so a shard is
    quantised with exactly the blocks the whole vector would be: error feedback
    computed on the whole vector then matches what is sent. Block counts differ
    by at most one; with fewer blocks than members the split is per value."""
    blocks = -(-numel // align) if align > 1 else numel
    unit = align if align > 1 and blocks >= k else 1
    if unit == 1:
        blocks = numel
    base, extra = divmod(blocks, k)
    out, start = [], 0
    for i in range(k):
        n = min((base + (1 if i < extra else 0)) * unit, numel - start)
        out.append((start, n))
        start += n
    return out


class _Pushes:
    """The PushShard calls of one collective: counts bytes, reports the first failure, waits for acks."""

    def __init__(self, on_error):
        self._on_error = on_error
        self._cond = threading.Condition()
        self._calls: List[grpc.Future] = []
        self._pending = 0
        self._stopping = False
        self.error: Optional[CollectiveError] = None
        self.bytes_sent = 0

    def count(self, n: int) -> None:
        with self._cond:
            self.bytes_sent += n

    def add(self, call: grpc.Future, dest: str, address: str, phase: int) -> None:
        with self._cond:
            self._calls.append(call)
            self._pending += 1
        call.add_done_callback(lambda f: self._done(f, dest, address, phase))

    def _done(self, call: grpc.Future, dest: str, address: str, phase: int) -> None:
        err, second_hand = None, False
        if not call.cancelled():
            e = call.exception()
            if e is not None:
                if isinstance(e, grpc.Call):  # an RPC that ended with a status: an RpcError that is also a Call
                    code, details = e.code(), e.details()
                else:
                    code, details = None, str(e)
                name = code.name if code is not None else type(e).__name__
                err = CollectiveError(f"phase-{phase} push to {dest!r} ({address}) failed: {name}: {details}")
                # the destination's collective is over (it failed): a second-hand failure
                second_hand = code == grpc.StatusCode.FAILED_PRECONDITION
        with self._cond:
            self._pending -= 1
            if err is not None and self.error is None and not self._stopping:
                self.error = err
            else:
                err = None
            self._cond.notify_all()
        if err is not None:
            self._on_error(err, second_hand)

    def wait(self, deadline: float) -> None:
        """Until every push is acknowledged; CollectiveError on a failure or at the deadline."""
        with self._cond:
            while self._pending and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveError(f"deadline passed with {self._pending} pushes not acknowledged")
                self._cond.wait(left)
            if self.error is not None:
                raise self.error

    def settle(self, deadline: float) -> None:
        """Until every push ended, however (acknowledged or refused), or the deadline."""
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def cancel(self) -> None:
        with self._cond:
            self._stopping = True
            calls = list(self._calls)
        for c in calls:
            c.cancel()


class GrpcCollective(Collective):
    """Mean of a flat float32 tensor over a group, over ``Peer.PushShard`` (see the module docstring).

    ``inbox`` is the :class:`ShardInbox` this peer's ``PeerServicer`` hands its PushShard streams to; when
    None a new one is made (``self.inbox``) and must be given to the servicer.
    """

    name = "grpc"

    def __init__(
        self,
        codec: Codec,
        me: str,
        token: str = "",
        tls=None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        streams: int = DEFAULT_STREAMS,
        inbox: Optional[ShardInbox] = None,
        culprit_grace_s: float = DEFAULT_CULPRIT_GRACE_S,
    ):
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes={chunk_bytes} is not allowed: 1..{MAX_CHUNK_BYTES}")
        if not 1 <= streams <= MAX_STREAMS:
            raise ValueError(f"streams={streams} is not allowed: 1..{MAX_STREAMS}")
        if not me:
            raise ValueError("me (this peer's id) must not be empty")
        self.codec, self.me, self.tls = codec, me, tls
        self.align = max(1, int(getattr(codec, "block_size", 1)))  # shard starts on codec blocks
        self.chunk_bytes, self.streams = int(chunk_bytes), int(streams)
        self.culprit_grace_s = float(culprit_grace_s)
        self.inbox = inbox if inbox is not None else ShardInbox()
        self._metadata = auth_metadata(token)
        self._lock = threading.Lock()
        # (address, lane) -> (channel, its PushShard callable)
        self._channels: "OrderedDict[Tuple[str, int], Tuple[grpc.Channel, grpc.StreamUnaryMultiCallable]]" = (
            OrderedDict()
        )

    # ------------------------------------------------------------ channels

    def _push_call(self, address: str, lane: int) -> grpc.StreamUnaryMultiCallable:
        """``Peer.PushShard`` on the channel of (address, lane), taking already serialised chunks."""
        with self._lock:
            entry = self._channels.get((address, lane))
            if entry is None:
                # Channels with identical arguments share one connection; a message limit that differs by
                # ``lane`` bytes (harmless) gives every lane a connection of its own.
                channel = make_channel(address, self.tls, MAX_MESSAGE_BYTES + lane)
                push = channel.stream_unary(
                    PUSH_SHARD, request_serializer=None, response_deserializer=pb.PushAck.FromString
                )
                entry = self._channels[(address, lane)] = (channel, push)
                while len(self._channels) > MAX_CHANNELS:
                    self._channels.popitem(last=False)[1][0].close()
            self._channels.move_to_end((address, lane))
            return entry[1]

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), OrderedDict()
        for channel, _ in channels:
            channel.close()

    # ------------------------------------------------------------ the collective

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        layout = self._check_args(flat, group, deadline_s)
        key: Key = (group.quorum_id, group.round, group.op)
        ids = [m[0] for m in group.members]
        k, r = len(ids), group.rank
        expected = {}
        if layout is None:
            bounds = shard_bounds(flat.numel(), k, self.align)
            for j, peer in enumerate(ids):
                if j != r:
                    expected[(1, r, peer)] = bounds[r][1]  # their slice of my shard
                    expected[(2, j, peer)] = bounds[j][1]  # their mean shard
        else:
            bounds = []
            for j, peer in enumerate(ids):
                if j != r:
                    lo, hi, a, b = layout.part(j, r)
                    expected[(1, r, peer)] = b - a  # the blocks of their payload that hold my shard's coordinates
                    expected[(2, j, peer)] = layout.covered_counts[j]  # their shard's covered means
        self.inbox.open(key, self.me, ids, self.codec, expected)
        pushes = _Pushes(
            lambda err, second_hand: self.inbox.fail(key, err, self.culprit_grace_s if second_hand else 0.0)
        )
        try:
            x = flat.detach().contiguous()
            if layout is None:
                result = self._run(x, group, key, bounds, pushes, deadline)
            else:
                result = self._run_masked(x, group, key, layout, pushes, deadline)
        except BaseException as e:
            pushes.cancel()
            self.inbox.close(key, f"failed: {e}")
            log.warning(
                "collective (quorum %d, round %d, op %r) failed on %s after %.2fs: %s",
                *key,
                self.me,
                time.monotonic() - t0,
                e,
            )
            raise
        bytes_recv = self.inbox.close(key)
        covered = None if layout is None or layout.covered is None else layout.covered.clone()
        return CollectiveResult(result, pushes.bytes_sent, bytes_recv, time.monotonic() - t0, covered)

    def _check_args(self, flat: torch.Tensor, group: Group, deadline_s: float) -> Optional[ShardLayout]:
        """ValueError for a caller's mistake; the shard layout when the group has masks (else None)."""
        if (
            not isinstance(flat, torch.Tensor)
            or flat.dim() != 1
            or flat.dtype != torch.float32
            or flat.device.type != "cpu"
        ):
            raise ValueError("flat must be a 1-D float32 CPU tensor")
        if group.me != self.me:
            raise ValueError(f"group.me={group.me!r} is not this collective's member {self.me!r}")
        ids = [m[0] for m in group.members]
        if self.me not in ids or len(set(ids)) != len(ids) or not all(ids):
            raise ValueError(f"members {ids} must be distinct non-empty ids including {self.me!r}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s={deadline_s} must be > 0")
        n = check_masks(group.masks, len(ids))
        if n is None:
            return None
        weights = tuple(group.weight(j) for j in range(len(ids)))
        _ = group.total_weight  # ValueError when nobody trained, as without masks
        return shard_layout(group.masks, weights, n, self.align)

    def _run(
        self,
        flat: torch.Tensor,
        group: Group,
        key: Key,
        bounds: List[Tuple[int, int]],
        pushes: _Pushes,
        deadline: float,
    ) -> torch.Tensor:
        ids = [m[0] for m in group.members]
        k, r = len(ids), group.rank
        start_r, n_r = bounds[r]
        # phase 1: my slice of every other shard to its owner (starting after me, so owners are not all hit
        # by everyone at once), then my own slice through the same encode/decode
        for step in range(1, k):
            i = (r + step) % k
            start, n = bounds[i]
            payload = self._encode(flat[start : start + n], f"shard {i}")
            self._push(pushes, group, i, 1, i, payload, n, deadline)
        mine = self._decode_own(self._encode(flat[start_r : start_r + n_r], f"shard {r}"), n_r)
        slices = self.inbox.wait(key, 1, deadline)
        total = torch.zeros(n_r, dtype=torch.float32)
        for j in range(k):  # ring order: the same sum on every run
            weighted_sum_into(total, mine if j == r else slices[(r, ids[j])], group.weight(j))
        total.div_(group.total_weight)
        mean_payload = self._encode(total, f"the mean of shard {r}")
        # phase 2: the encoded mean to every other member; I decode the same bytes
        for step in range(1, k):
            j = (r + step) % k
            self._push(pushes, group, j, 2, r, mean_payload, n_r, deadline)
        result = torch.empty(flat.numel(), dtype=torch.float32)
        result[start_r : start_r + n_r] = self._decode_own(mean_payload, n_r)
        means = self.inbox.wait(key, 2, deadline)
        for j in range(k):
            if j != r:
                start, n = bounds[j]
                result[start : start + n] = means[(j, ids[j])]
        pushes.wait(deadline)
        return result

    def _run_masked(
        self,
        flat: torch.Tensor,
        group: Group,
        key: Key,
        lay: ShardLayout,
        pushes: _Pushes,
        deadline: float,
    ) -> torch.Tensor:
        """``_run`` for a group with masks (module docstring, Slices): ``flat`` is this member's compact payload."""
        ids = [m[0] for m in group.members]
        k, r = len(ids), group.rank
        if flat.numel() != lay.counts[r]:
            self._refuse_own_payload(flat.numel(), group, lay, pushes, deadline)
        # phase 1: the blocks of my payload that hold my coordinates of every other shard, to its owner
        for step in range(1, k):
            i = (r + step) % k
            _, _, a, b = lay.part(r, i)
            if b > a:
                self._push(pushes, group, i, 1, i, self._encode(flat[a:b], f"shard {i}"), b - a, deadline)
        _, _, a, b = lay.part(r, r)
        mine = self._decode_own(self._encode(flat[a:b], f"shard {r}"), b - a)
        slices = self.inbox.wait(key, 1, deadline)
        start, stop = lay.edges[r], lay.edges[r + 1]
        parts, local = [], []
        for j in range(k):  # ring order: the same sum on every run
            lo, hi, a, _ = lay.part(j, r)
            got = mine if j == r else slices[(r, ids[j])]
            parts.append(got[lo - a : hi - a])
            mask = group.mask(j)
            local.append(None if mask is None else mask[start:stop])
        weights = [group.weight(j) for j in range(k)]
        mean, _ = masked_weighted_mean(parts, local, weights, stop - start)
        where = lay.covered_in(r)
        mean_payload = self._encode(mean if where is None else mean[where], f"the mean of shard {r}")
        # phase 2: the encoded means of my shard's covered coordinates to every other member
        for step in range(1, k):
            j = (r + step) % k
            self._push(pushes, group, j, 2, r, mean_payload, lay.covered_counts[r], deadline)
        result = torch.zeros(lay.n, dtype=torch.float32)
        self._place(result, lay, r, self._decode_own(mean_payload, lay.covered_counts[r]))
        means = self.inbox.wait(key, 2, deadline)
        for j in range(k):
            if j != r:
                self._place(result, lay, j, means[(j, ids[j])])
        pushes.wait(deadline)
        return result

    @staticmethod
    def _place(result: torch.Tensor, lay: ShardLayout, i: int, values: torch.Tensor) -> None:
        """Shard i's covered means into the full result (its uncovered coordinates stay 0.0)."""
        shard = result[lay.edges[i] : lay.edges[i + 1]]
        where = lay.covered_in(i)
        if where is None:
            shard.copy_(values)
        else:
            shard[where] = values

    def _refuse_own_payload(self, numel: int, group: Group, lay: ShardLayout, pushes: _Pushes, deadline: float):
        """This member's compact payload does not match its mask: have every other member name it, then raise.

        It cannot be split into the slots the others expect, so every other member gets a phase-1 slot one value
        longer than it expects, which its inbox refuses naming this member (the status byte of gloo's payloads
        does the same there); this member waits for those refusals so that none is cancelled on the way."""
        r = group.rank
        for step in range(1, group.size):
            i = (r + step) % group.size
            _, _, a, b = lay.part(r, i)
            self._push(pushes, group, i, 1, i, bytes(self.codec.encoded_size(b - a + 1)), b - a + 1, deadline)
        pushes.settle(deadline)
        raise CollectiveError(
            f"this member's payload has {numel} values, its mask covers {lay.counts[r]}", culprit=self.me
        )

    def _encode(self, x: torch.Tensor, what: str):
        try:
            return self.codec.encode_view(x.contiguous())
        except CodecError as e:
            raise CollectiveError(f"{self.codec.name} cannot encode this member's {what}: {e}") from None

    def _decode_own(self, payload, numel: int) -> torch.Tensor:
        try:
            return self.codec.decode(payload, numel)
        except CodecError as e:
            raise CollectiveError(f"{self.codec.name} refuses this member's own encoding: {e}") from None

    def _push(
        self, pushes: _Pushes, group: Group, dest: int, phase: int, shard: int, payload, numel: int, deadline: float
    ) -> None:
        """Send ``payload`` to member ``dest`` in chunks over up to ``streams`` parallel PushShard calls."""
        payload = memoryview(payload).cast("B")
        total = payload.nbytes
        if total == 0:
            return
        peer, address = group.members[dest]
        fields = dict(
            quorum_id=group.quorum_id,
            round=group.round,
            op=group.op,
            phase=phase,
            shard=shard,
            sender=self.me,
            codec=self.codec.name,
            numel=numel,
            total_bytes=total,
        )
        n_chunks = -(-total // self.chunk_bytes)
        lanes = min(self.streams, n_chunks)
        per_lane = -(-n_chunks // lanes)
        for lane in range(lanes):
            first, last = lane * per_lane, min(n_chunks, (lane + 1) * per_lane)
            if first >= last:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveError(f"deadline passed before the phase-{phase} push to {peer!r}")
            call = self._push_call(address, lane).future(
                self._chunks(fields, payload, first, last, pushes), timeout=left, metadata=self._metadata
            )
            pushes.add(call, peer, address, phase)

    def _chunks(self, fields: Dict, payload: memoryview, first: int, last: int, pushes: _Pushes):
        cb = self.chunk_bytes
        for c in range(first, last):
            raw = frame(pb.ShardChunk(offset=c * cb, **fields), payload[c * cb : (c + 1) * cb])
            pushes.count(len(raw) + GRPC_FRAME_BYTES)
            yield raw
