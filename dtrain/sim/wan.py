"""A user-space WAN emulator: HTTP CONNECT proxies that delay, throttle, stall and reset TCP links.

The kernel of the development machines has no ``netem``, so the local
simulation gets its WAN here. Every simulated node (each peer leader; the
coordinator) gets an **egress proxy**; the node's gRPC channels go through it
because its environment carries ``grpc_proxy=http://127.0.0.1:PORT``
(gRPC's standard HTTP CONNECT proxy support). The proxy knows the source node
(whose egress it is) and looks the destination address up among registered
nodes, so every connection belongs to a **link** between two regions, with
its own parameters:

    one-way latency L, jitter J, bandwidth B (token bucket, shared by every
    connection of the link in that direction), faults

A chunk of n bytes read at time t from one side is written to the other at

    d = max(d_prev, t_send + n / B + L + U(-J, J)),  t_send = max(t, bucket free)

(``d_prev`` keeps TCP's order; the bucket is the link's serialisation; a node
may also have an uplink bucket shared by everything it sends). At most
``buffer_bytes`` are in flight per connection direction, so a fast sender is
back-pressured like on a real link. Faults act on a link at once:
``reset(link)`` aborts its connections with a TCP RST, ``stall(link, T)``
delivers nothing on it for T seconds. All randomness comes from one seeded
generator.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Set, Tuple

log = logging.getLogger("dtrain.sim")

CHUNK = 64 << 10


@dataclass(frozen=True)
class LinkSpec:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbit: float = 0.0  # 0: unlimited

    def check(self, where: str) -> None:
        for name in ("latency_ms", "jitter_ms", "bandwidth_mbit"):
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"{where}.{name}={v} is not allowed: must be >= 0")


@dataclass
class _LinkState:
    spec: LinkSpec
    free_at: Dict[int, float] = field(default_factory=lambda: {0: 0.0, 1: 0.0})  # per direction
    stalled_until: float = 0.0
    conns: Set["_Conn"] = field(default_factory=set)
    bytes: Dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0})


class _Conn:
    def __init__(self, link: _LinkState, writers):
        self.link, self.writers = link, writers


class WanEmulator:
    """Egress proxies for named nodes; ``link_of(src_region, dst_region) -> LinkSpec`` gives each link."""

    def __init__(
        self,
        link_of: Callable[[str, str], LinkSpec],
        seed: int = 0,
        buffer_bytes: int = 8 << 20,
        host: str = "127.0.0.1",
    ):
        self.link_of, self.host, self.buffer_bytes = link_of, host, buffer_bytes
        self.rng = random.Random(seed)
        self.regions: Dict[str, str] = {}  # node -> region
        self.addresses: Dict[str, str] = {}  # "host:port" -> node
        self.links: Dict[Tuple[str, str], _LinkState] = {}  # (node a, node b) sorted
        self.uplink: Dict[str, float] = {}  # node -> bytes per second (0: no cap)
        self.uplink_free: Dict[str, float] = {}  # node -> when its uplink is free again
        self.loop = asyncio.new_event_loop()
        self._servers: Dict[str, asyncio.AbstractServer] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, name="wan-emulator", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ nodes
    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_node(self, name: str, region: str = "", uplink_mbit: float = 0.0) -> str:
        """Start ``name``'s egress proxy; returns the ``grpc_proxy`` URL its process must use.

        ``uplink_mbit`` > 0 also caps everything the node sends, over all its links together
        (a host's access link), on top of each link's own bandwidth."""
        self.regions[name] = region
        self.uplink[name] = uplink_mbit * 1e6 / 8
        self.uplink_free[name] = 0.0

        async def start():
            srv = await asyncio.start_server(lambda r, w: self._accept(name, r, w), self.host, 0)
            self._servers[name] = srv
            return srv.sockets[0].getsockname()[1]

        port = self._call(start())
        return f"http://{self.host}:{port}"

    def register(self, name: str, address: str) -> None:
        """``address`` (host:port) belongs to node ``name``: connections to it use ``name``'s links."""
        self.addresses[address] = name

    def nodes(self) -> List[str]:
        return list(self.regions)

    # ------------------------------------------------------------------ links and faults
    def _link(self, a: str, b: str) -> _LinkState:
        key = tuple(sorted((a, b)))
        st = self.links.get(key)
        if st is None:
            st = self.links[key] = _LinkState(self.link_of(self.regions.get(a, ""), self.regions.get(b, "")))
        return st

    def reset(self, a: str, b: str) -> int:
        """Abort every connection between nodes a and b with a TCP RST; returns how many."""
        return self._call(self._reset(a, b))

    async def _reset(self, a: str, b: str) -> int:
        st = self._link(a, b)
        n = 0
        for conn in list(st.conns):
            for w in conn.writers:
                _abort(w)
            n += 1
        st.conns.clear()
        return n

    def stall(self, a: str, b: str, seconds: float) -> None:
        """Deliver nothing between a and b for ``seconds`` (bytes wait in the buffers)."""

        async def go():
            st = self._link(a, b)
            st.stalled_until = max(st.stalled_until, time.monotonic() + seconds)

        self._call(go())

    def link_bytes(self) -> Dict[str, int]:
        return {f"{a}<->{b}": st.bytes[0] + st.bytes[1] for (a, b), st in self.links.items()}

    def close(self) -> None:
        async def stop():
            for srv in self._servers.values():
                srv.close()
            for st in self.links.values():
                for conn in st.conns:
                    for w in conn.writers:
                        _abort(w)

        try:
            self._call(stop())
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    # ------------------------------------------------------------------ proxying
    async def _accept(self, src: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0].upper() != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            target = line[1]
            host, _, port = target.rpartition(":")
            up_r, up_w = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError) as e:
            log.debug("wan proxy of %s: bad connect: %s", src, e)
            try:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                writer.close()
            except OSError:
                pass
            return
        dst = self.addresses.get(target, target)
        st = self._link(src, dst)
        direction = 0 if (src, dst) == tuple(sorted((src, dst))) else 1
        conn = _Conn(st, (writer, up_w))
        st.conns.add(conn)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        try:
            await asyncio.gather(
                self._pump(reader, up_w, st, direction, src), self._pump(up_r, writer, st, 1 - direction, dst)
            )
        finally:
            st.conns.discard(conn)
            for w in (writer, up_w):
                try:
                    w.close()
                except OSError:
                    pass

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: _LinkState, direction: int, sender: str
    ) -> None:
        """Read -> schedule delivery -> write, with at most ``buffer_bytes`` in flight."""
        queue: "collections.deque[Tuple[float, bytes]]" = collections.deque()
        in_flight = [0]
        wake = asyncio.Event()
        space = asyncio.Event()
        space.set()
        done = [False]

        async def deliver():
            while True:
                while not queue:
                    if done[0]:
                        return
                    wake.clear()
                    await wake.wait()
                at, data = queue[0]
                while True:
                    now = time.monotonic()
                    wait = max(at, st.stalled_until) - now
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                queue.popleft()
                writer.write(data)
                await writer.drain()
                in_flight[0] -= len(data)
                st.bytes[direction] += len(data)
                if in_flight[0] < self.buffer_bytes:
                    space.set()

        delivery = asyncio.ensure_future(deliver())
        last_at = 0.0
        spec = st.spec
        bw = spec.bandwidth_mbit * 1e6 / 8  # bytes per second
        try:
            while True:
                await space.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                now = time.monotonic()
                t_done = max(now, st.free_at[direction]) + (len(data) / bw if bw > 0 else 0.0)
                st.free_at[direction] = t_done
                up = self.uplink.get(sender, 0.0)
                if up > 0:  # the sender's access link, shared by all its connections
                    up_done = max(now, self.uplink_free[sender]) + len(data) / up
                    self.uplink_free[sender] = up_done
                    t_done = max(t_done, up_done)
                jitter = self.rng.uniform(-spec.jitter_ms, spec.jitter_ms) / 1e3 if spec.jitter_ms else 0.0
                at = max(last_at, t_done + max(0.0, spec.latency_ms / 1e3 + jitter))
                last_at = at
                queue.append((at, data))
                in_flight[0] += len(data)
                if in_flight[0] >= self.buffer_bytes:
                    space.clear()
                wake.set()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            done[0] = True
            wake.set()
        try:
            await delivery
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), like a middlebox dropping the connection."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    except OSError:
        pass
