"""The ``gloo`` outer collective: the mean over torch.distributed gloo process groups.

Math. Member m (ring position m = 0..k-1) holds x_m, N float32 values; every
member returns the same bits of mean = (x_0 + ... + x_{k-1}) / k.

- ``fp32`` codec: gloo's ring allreduce (SUM), then ``/ k``. Each element is
  summed once, by the owner of its chunk, and the all-gather half copies those
  bytes to everyone: bit-identical on every member (tested, k = 2..4, N not
  divisible by k). The order of the sum is gloo's (it rotates with the
  chunk), not ring order: fixed for given (k, N), but not the ``grpc`` bits.
- other codecs: all_gather of p_m = [status byte] + E(x_m) (equal lengths
  1 + encoded_size(N)); every member decodes all of them and sums in ring order
  in float32, mean = ((D(p_0) + D(p_1)) + ... + D(p_{k-1})) / k: the same
  operations on the same bytes, identical bits, and no re-quantised sum. A
  payload that does not decode (CodecError, shape, non-finite) raises
  CollectiveError naming its sender; the status byte lets a member that cannot
  encode its input (NaN, overflow) take part and be named rather than stall.
- weights (``group.weights``, ``dtrain.outer.weighting``): fp32 scales x_m by
  w_m before the SUM; the others add fl(w_m * D(p_m)) (never fused), skipping
  w_m = 0; both divide by sum(w). All weights 1: the bits above. A sum that
  overflows (finite inputs) raises CollectiveError naming nobody, both paths.

Slices (``group.masks``, ``dtrain.outer.masking``). Member m's ``flat`` is then
its compact payload of c_m values (the full N when its mask is None); every
member returns the full N and ``covered``, the same bits everywhere.

- ``fp32``: x_m is scattered into N zeros and scaled by w_m, gloo sums those
  (SUM), and every member divides each coordinate by its weight sum W, computed
  locally from the masks and weights (0.0 where W = 0). The sum's order is
  gloo's, as above: within float32 rounding of the formula.
- other codecs: all_gather needs one size, so every payload is padded to the
  longest, 1 + max_j encoded_size(c_j) (known from the masks), and stripped to
  its member's 1 + encoded_size(c_m) before decoding; the decoded parts go
  through ``masked_weighted_mean`` in ring order: the formula, bit for bit.
- A member whose compact payload is not c_m long takes part flagged (status
  byte ``_BAD``; on the fp32 path it contributes NaN, so that everyone takes the
  failure path, where it flags itself) and is named by everyone.
- The masks' hash joins the rendezvous check (a member with other masks is
  named) and the group's cache key.

Bytes are NOT proportional to a member's slice here: gloo's allreduce reduces
one dense buffer of the same N values on every rank (its ring moves
2 (k-1)/k * 4N whatever the masks), and all_gather moves k buffers of one
size, the longest member's; a capped member's payload is padded up to it.
(Only the grpc backend sends slices alone.)

Bytes per member (sent = received). gloo has no transport counters reachable
from Python, so these are what the algorithm moves (no TCP framing):
    allreduce (ring):  2 (k-1)/k * 4N
    all_gather (ring): (k-1) * (1 + encoded_size(N))
i.e. all_gather moves k/2 times the values of a ring allreduce: cheaper than
the fp32 allreduce for int8 (~1.02 N bytes) while k < 8, int4 (~0.52 N) while
k < 16, fp16/bf16 while k < 4. Decoding happens after the exchange.

Groups. One ``ProcessGroupGloo`` per (quorum id, op), built directly (never via
``init_process_group``, which the peer's own ranks may use) over a
``PrefixStore`` ``dtrain/gloo/q<id>/<op>/r<round built>/a<attempt>`` on a
``TCPStore`` client of ``group.store_address``; rank = position in
``group.members``. Rounds of the same quorum reuse it; a new quorum id drops
the old quorum's groups; any failure drops the group (unusable after a
timeout). Before the rendezvous every member publishes (codec, N, members),
waits for the others' and checks them: gloo kills the process (C++ terminate)
when sizes differ, so a mismatch is caught first and its holder named.

Deadline. Every blocking step (store connection, rendezvous, each gloo op) gets
the time left until ``deadline_s`` as its timeout, so a member that never
joins or stops makes the others raise by the deadline. A dead member is seen
at once by its neighbours; they destroy their group, closing its sockets,
which fails everyone else's waits too (~20 ms on loopback). Backstop: the
exchange runs in a helper thread, abandoned at deadline + ``timeout_margin_s``.

gloo trusts its peers' framing (and the store has no auth): use ``grpc``
between parties that do not trust each other.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..errors import one_line
from ..outer.masking import (
    check_masks,
    covered_mask,
    divide_by_weight_sums,
    masked_weighted_mean,
    masks_digest,
    scatter,
)
from ..outer.weighting import weighted_sum_into
from ..wire.codec import Codec, CodecError
from .collective import Collective, CollectiveError, CollectiveResult, Group, evidence_of

log = logging.getLogger("dtrain.comm")

_OK, _BAD = 1, 0  # status byte of a payload
_MIN_LEFT_S = 0.05  # never hand gloo a timeout shorter than this
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, _MIN_LEFT_S))


def _split_host_port(address: str) -> Tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass
class _Entry:
    key: tuple  # what must not change for the group to be reused
    pg: object  # ProcessGroupGloo


class GlooCollective(Collective):
    """Mean of a flat float32 tensor over gloo process groups (see the module docstring).

    ``interface`` or ``hostname`` choose the local address gloo listens on and
    advertises to the others; without them: ``GLOO_SOCKET_IFNAME``, else the
    host of this member's own (advertised) address in ``group.members`` when
    gloo can listen on it, else gloo's default (the machine's hostname).
    ``timeout_margin_s``: how long after the deadline a stuck exchange is
    abandoned (see the module docstring). ``groups_built`` counts the process
    groups built, ``live_groups`` those cached now.
    """

    name = "gloo"

    def __init__(
        self,
        codec: Codec,
        timeout_margin_s: float = 2.0,
        hostname: Optional[str] = None,
        interface: Optional[str] = None,
    ):
        if not timeout_margin_s >= 0:
            raise ValueError(f"timeout_margin_s={timeout_margin_s} must be >= 0")
        self.codec = codec
        self.timeout_margin_s = float(timeout_margin_s)
        self.hostname, self.interface = hostname, interface
        self.native = codec.name == "fp32" and codec.lossless  # gloo's own allreduce; else all_gather
        self.groups_built = 0
        self._lock = threading.Lock()
        self._groups: Dict[str, _Entry] = {}  # op -> the group of the current quorum
        self._stores: Dict[str, dist.TCPStore] = {}  # store address -> TCPStore client
        self._attempts: Dict[tuple, int] = {}  # (store, quorum id, op, round) -> builds so far
        self._device = None

    @property
    def live_groups(self) -> int:
        with self._lock:
            return len(self._groups)

    def close(self) -> None:
        with self._lock:
            self._groups.clear()
            self._stores.clear()
            self._attempts.clear()

    # ------------------------------------------------------------ the collective

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        full = self._check_args(flat, group, deadline_s)
        x = flat.detach().contiguous()
        if full is not None:
            return self._masked(x, group, full, deadline, t0)
        k, n = group.size, x.numel()
        if k == 1 or n == 0:
            return CollectiveResult(self._alone(x, group), 0, 0, time.monotonic() - t0)
        if self.native:
            mean = self._run(group, n, deadline, lambda pg, left: self._sum_fp32(pg, x, group, left))
            moved = 2 * (k - 1) * 4 * n // k
        else:
            payload = self._payload(x)
            gathered = self._run(group, n, deadline, lambda pg, left: self._gather(pg, payload, k, left))
            mean = self._decode_mean(gathered, group, n)
            moved = (k - 1) * payload.numel()
        return CollectiveResult(mean, moved, moved, time.monotonic() - t0)

    def _check_args(self, flat: torch.Tensor, group: Group, deadline_s: float) -> Optional[int]:
        """ValueError for a caller's mistake; the full length N when the group has masks (else None)."""
        if (
            not isinstance(flat, torch.Tensor)
            or flat.dim() != 1
            or flat.dtype != torch.float32
            or flat.device.type != "cpu"
        ):
            raise ValueError("flat must be a 1-D float32 CPU tensor")
        ids = [m[0] for m in group.members]
        if group.me not in ids or len(set(ids)) != len(ids) or not all(ids):
            raise ValueError(f"members {ids} must be distinct non-empty ids including {group.me!r}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s={deadline_s} must be > 0")
        n = check_masks(group.masks, len(ids))
        if n is not None:
            _ = group.total_weight  # ValueError when nobody trained, as without masks
        return n

    # ------------------------------------------------------------ slices

    def _masked(self, x: torch.Tensor, group: Group, n: int, deadline: float, t0: float) -> CollectiveResult:
        """The collective of a group with masks (module docstring, Slices); ``x`` is this member's payload."""
        k, r = group.size, group.rank
        masks = group.masks
        weights = [group.weight(j) for j in range(k)]
        counts = [n if m is None else int(m.sum()) for m in masks]
        valid = x.numel() == counts[r]
        if not valid:
            log.warning("this member's payload has %d values, its mask covers %d", x.numel(), counts[r])
        covered = covered_mask(masks, weights, n)
        if k == 1 or n == 0:
            if not valid:
                raise CollectiveError(
                    f"this member's payload has {x.numel()} values, its mask covers {counts[r]}", culprit=group.me
                )
            mean = scatter(self._alone(x, group), masks[r], n)
            if covered is not None:
                mean.masked_fill_(~covered, 0.0)
            return CollectiveResult(mean, 0, 0, time.monotonic() - t0, covered)
        digest = masks_digest(masks)
        if self.native:
            mean = self._run(
                group, n, deadline, lambda pg, left: self._sum_masked(pg, x, valid, group, n, left), digest
            )
            moved = 2 * (k - 1) * 4 * n // k
        else:
            size = 1 + max(self.codec.encoded_size(c) for c in counts)
            payload = self._payload(x, size) if valid else self._bad(size)
            gathered = self._run(group, n, deadline, lambda pg, left: self._gather(pg, payload, k, left), digest)
            parts = [
                self._decode_part(buf[: 1 + self.codec.encoded_size(c)], group.members[j][0], c)
                for j, (buf, c) in enumerate(zip(gathered, counts))
            ]
            mean, _ = masked_weighted_mean(parts, masks, weights, n)
            if not _finite(mean):
                raise CollectiveError("the sum of the decoded payloads overflowed (every payload was finite)")
            moved = (k - 1) * size
        return CollectiveResult(mean, moved, moved, time.monotonic() - t0, covered)

    def _sum_masked(self, pg, x: torch.Tensor, valid: bool, group: Group, n: int, left: Callable[[], float]):
        k, r = group.size, group.rank
        weight = group.weight(r)
        if valid:
            buf = scatter(x, group.masks[r], n)
            if weight != 1:
                buf.mul_(weight)
        else:  # a payload that does not fit the mask: make everyone take the failure path, flagged below
            buf = torch.full((n,), float("nan"))
        pg.allreduce(buf, dist.ReduceOp.SUM, _timedelta(left())).wait()
        if _finite(buf):  # checked before dividing, which zeroes the uncovered coordinates
            return divide_by_weight_sums(buf, group.masks, [group.weight(j) for j in range(k)])
        flag = torch.tensor([_OK if valid and _finite(x) else _BAD], dtype=torch.uint8)
        for j, f in enumerate(self._gather(pg, flag, k, left)):
            if int(f[0]) != _OK:
                peer = group.members[j][0]
                raise CollectiveError(
                    f"member {peer!r} sent non-finite values or a payload unlike its mask", culprit=peer
                )
        raise CollectiveError("the fp32 sum overflowed (every input was finite)")

    @staticmethod
    def _bad(size: int) -> torch.Tensor:
        out = torch.zeros(size, dtype=torch.uint8)
        out[0] = _BAD
        return out

    def _alone(self, x: torch.Tensor, group: Group) -> torch.Tensor:
        """k = 1 (or N = 0): no traffic; a quantised codec still applies D(E(x)), as it would with others."""
        if self.native or x.numel() == 0:
            return x.clone()
        try:
            out = self.codec.decode(self.codec.encode(x), x.numel())
        except CodecError as e:
            raise CollectiveError(
                f"{self.codec.name} cannot encode this member's input: {e}", culprit=group.me
            ) from None
        return out

    # ------------------------------------------------------------ fp32: native allreduce

    def _sum_fp32(self, pg, x: torch.Tensor, group: Group, left: Callable[[], float]) -> torch.Tensor:
        buf = x.clone()
        weight = group.weight(group.rank)
        if weight != 1:
            buf.mul_(weight)  # sum of w_i * x_i, then / sum of w_i (dtrain.outer.weighting)
        pg.allreduce(buf, dist.ReduceOp.SUM, _timedelta(left())).wait()
        buf.div_(group.total_weight)
        if _finite(buf):
            return buf
        # failure path only: who sent non-finite values? (one byte each, self-reported)
        flag = torch.tensor([_OK if _finite(x) else _BAD], dtype=torch.uint8)
        flags = self._gather(pg, flag, group.size, left)
        for r, f in enumerate(flags):
            if int(f[0]) != _OK:
                peer = group.members[r][0]
                raise CollectiveError(f"member {peer!r} sent non-finite values", culprit=peer)
        raise CollectiveError("the fp32 sum overflowed (every input was finite)")

    # ------------------------------------------------------------ other codecs: all_gather + local decode

    def _payload(self, x: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        """[status byte] + E(x), zero-padded to ``size`` bytes when given (the masked all_gather)."""
        body_size = self.codec.encoded_size(x.numel())
        size = 1 + body_size if size is None else size
        out = torch.zeros(size, dtype=torch.uint8)
        try:
            body = self.codec.encode(x)
        except CodecError as e:
            # still take part, flagged, so that everyone names this member instead of timing out
            log.warning("%s cannot encode this member's input: %s", self.codec.name, e)
            out[0] = _BAD
            return out
        if len(body) != body_size:
            raise ValueError(f"{self.codec.name}.encode gave {len(body)} bytes, encoded_size says {body_size}")
        out[0] = _OK
        if body_size:
            out[1 : 1 + body_size] = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        return out

    @staticmethod
    def _gather(pg, payload: torch.Tensor, k: int, left: Callable[[], float]) -> List[torch.Tensor]:
        outs = [torch.empty_like(payload) for _ in range(k)]
        pg.allgather(outs, payload, _timedelta(left())).wait()
        return outs

    def _decode_mean(self, gathered: List[torch.Tensor], group: Group, n: int) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for r, buf in enumerate(gathered):  # ring order: the same float32 sum on every member
            part = self._decode_part(buf, group.members[r][0], n)
            weight = group.weight(r)
            if total is None:
                total = part if weight == 1 else part.mul_(weight)  # decode returns a new tensor
            else:
                weighted_sum_into(total, part, weight)
        if total is None:  # one payload per member, this one included: only an empty group gets here
            raise CollectiveError(f"no payloads to average in a group of {group.size}")
        total.div_(group.total_weight)
        if not _finite(total):  # as the fp32 path, and grpc's owner (its encode refuses it): never apply inf
            raise CollectiveError("the sum of the decoded payloads overflowed (every payload was finite)")
        return total

    def _decode_part(self, buf: torch.Tensor, peer: str, n: int) -> torch.Tensor:
        """One member's gathered [status] + E(x) as n finite float32 values; CollectiveError naming it if not."""
        status = int(buf[0])
        if status != _OK:
            what = "could not encode its input" if status == _BAD else f"sent status byte {status}"
            raise CollectiveError(f"member {peer!r} {what}", culprit=peer, evidence=evidence_of(buf.numpy()))
        try:
            part = self.codec.decode(buf[1:].numpy().tobytes(), n)
        except CodecError as e:
            raise CollectiveError(
                f"member {peer!r} sent an invalid {self.codec.name} payload: {e}",
                culprit=peer,
                evidence=evidence_of(buf.numpy()),
            ) from None
        if not isinstance(part, torch.Tensor) or part.dtype != torch.float32 or part.shape != (n,) or not _finite(part):
            raise CollectiveError(
                f"member {peer!r}'s {self.codec.name} payload decodes to something other "
                f"than {n} finite float32 values",
                culprit=peer,
                evidence=evidence_of(buf.numpy()),
            )
        return part

    # ------------------------------------------------------------ groups

    def _run(self, group: Group, n: int, deadline: float, fn, masks: str = ""):
        """``fn(pg, left)`` on the group's process group (built when needed), under the deadline.

        ``masks``: the masks' digest ("" without masks), checked at the rendezvous like N.
        Any failure drops the group; errors other than CollectiveError become CollectiveError.
        """
        key = (group.store_address, group.quorum_id, group.members, n, self.codec.name, masks)
        with self._lock:
            for op in [op for op, e in self._groups.items() if e.key[:2] != key[:2]]:
                del self._groups[op]  # an older quorum (or another store): torn down
            self._attempts = {a: c for a, c in self._attempts.items() if a[:2] == key[:2]}
            entry = self._groups.get(group.op)
            if entry is not None and entry.key != key:
                del self._groups[group.op]
                entry = None

        def left() -> float:
            return deadline - time.monotonic()

        def work():
            e = entry if entry is not None else self._build(group, n, key, left)
            if left() <= 0:
                raise CollectiveError(
                    f"deadline passed before the exchange (quorum {group.quorum_id}, op {group.op!r})"
                )
            return e, fn(e.pg, left)

        try:
            new_entry, value = self._guarded(work, deadline, group)
        except BaseException as err:
            how = "reused" if entry is not None else "new"
            entry = None  # with the frames dropped in _guarded, nothing holds a failed group any more:
            self._forget(group)  # it is destroyed now, and its closed sockets fail the others' waits at once
            if isinstance(err, CollectiveError):
                raise
            if isinstance(err, (RuntimeError, OSError, ValueError)):  # gloo, TCPStore (DistError: RuntimeError)
                raise CollectiveError(
                    f"gloo exchange failed (quorum {group.quorum_id}, op {group.op!r}, {how} group): {one_line(err)}"
                ) from err
            raise
        if entry is None:
            with self._lock:
                if all(e.key[:2] == key[:2] for e in self._groups.values()):
                    self._groups[group.op] = new_entry
        return value

    def _guarded(self, work, deadline: float, group: Group):
        """Run ``work()`` in a helper thread; give up on it at deadline + margin."""
        box: dict = {}

        def target():
            try:
                box["value"] = work()
            except BaseException as e:  # handed to the caller
                if isinstance(e, (RuntimeError, OSError, ValueError)):
                    _drop_frames(e)
                box["error"] = e

        t = threading.Thread(target=target, name=f"gloo-{group.op}", daemon=True)
        t.start()
        t.join(max(0.0, deadline + self.timeout_margin_s - time.monotonic()))
        if t.is_alive():
            raise CollectiveError(
                f"gloo exchange did not end by the deadline + {self.timeout_margin_s:.1f}s "
                f"margin (quorum {group.quorum_id}, op {group.op!r}); abandoned"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _forget(self, group: Group) -> None:
        with self._lock:
            self._groups.pop(group.op, None)
            self._stores.pop(group.store_address, None)  # reconnect too: the store may have gone

    def _store(self, address: str, left: float) -> dist.TCPStore:
        with self._lock:
            store = self._stores.get(address)
        if store is None:
            host, port = _split_host_port(address)
            store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=_timedelta(left))
            with self._lock:
                self._stores[address] = store
        store.set_timeout(_timedelta(left))
        return store

    def _build(self, group: Group, n: int, key: tuple, left: Callable[[], float]) -> _Entry:
        if not group.store_address:
            raise CollectiveError("no gloo store address: run the coordinator with gloo_store=true")
        k, rank = group.size, group.rank
        store = self._store(group.store_address, left())
        attempt_key = (group.store_address, group.quorum_id, group.op, group.round)
        with self._lock:
            attempt = self._attempts[attempt_key] = self._attempts.get(attempt_key, 0) + 1
        prefix = f"dtrain/gloo/q{group.quorum_id}/{group.op}/r{group.round}/a{attempt}"
        pstore = dist.PrefixStore(prefix, store)
        ids = [m[0] for m in group.members]
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
        meta = f"{self.codec.name} {n} {digest}" + (f" masks {key[5]}" if key[5] else "")
        pstore.set(f"meta/{rank}", meta)
        # every member checks the others' (codec, N, members) BEFORE any gloo socket exists: a mismatch
        # is then named by everyone alike, and no member tears down a half-built mesh under the others
        keys = [f"meta/{r}" for r in range(k)]
        pstore.wait(keys, _timedelta(left()))
        metas = [v.decode() for v in pstore.multi_get(keys)]
        if len(set(metas)) > 1:
            counts = {m: metas.count(m) for m in metas}
            ref = max(metas, key=lambda m: (counts[m], -metas.index(m)))  # majority; tie: the earliest
            bad = next(r for r, m in enumerate(metas) if m != ref)
            raise CollectiveError(
                f"member {ids[bad]!r} has (codec, numel, members) {metas[bad]!r}, the others {ref!r}", culprit=ids[bad]
            )
        # torch's stubs (torch/_C/_distributed_c10d.pyi) omit ProcessGroupGloo._Options, the bound class that
        # has _devices and _threads (the stubs' ProcessGroupGloo.Options is Backend.Options at runtime)
        opts = dist.ProcessGroupGloo._Options()  # pyright: ignore[reportAttributeAccessIssue]
        opts._timeout = _timedelta(left())
        opts._threads = 1
        opts._devices = [self._gloo_device(group)]
        pg = dist.ProcessGroupGloo(pstore, rank, k, opts)  # rendezvous: waits for all k (timeout above)
        with self._lock:
            self.groups_built += 1
        log.info("gloo group built under %r: rank %d of %d", prefix, rank, k)
        return _Entry(key, pg)

    def _gloo_device(self, group: Group):
        with self._lock:
            if self._device is not None:
                return self._device
        G = dist.ProcessGroupGloo
        env_if = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
        if self.interface:
            dev = G.create_device(interface=self.interface, lazy_init=False)
        elif self.hostname:
            dev = G.create_device(hostname=self.hostname, lazy_init=False)
        elif env_if:
            dev = G.create_device(interface=env_if, lazy_init=False)
        else:
            dev = None
            try:
                host = _split_host_port(group.members[group.rank][1])[0]
            except ValueError:
                host = ""
            if host not in _WILDCARD_HOSTS:
                try:
                    dev = G.create_device(hostname=host, lazy_init=False)
                except RuntimeError as e:  # not a local address (NAT, a name for another interface)
                    log.info("gloo cannot listen on %s (%s); using its default device", host, one_line(e))
            if dev is None:
                dev = G.create_default_device(lazy_init=False)
        with self._lock:
            self._device = dev
        return dev


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _drop_frames(err: Optional[BaseException]) -> None:
    """Forget the tracebacks of ``err`` and its causes (their frames reference the process group)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
