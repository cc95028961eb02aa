"""The gRPC floor for bench/control_plane.py: the same round traffic against a server that does nothing.

A bare ``grpc.aio`` server (one process, no auth, no interceptors, no state
machine, no persistence, no logging) serves two unary methods taking and
returning raw bytes: ``Sync(round)`` and ``Commit(round)``. Each holds every
call of a round until all N peers have called, then answers them all, i.e.
exactly the barrier the coordinator's quorum and commit are, minus the
coordinator's own work. N peers run as threads in the same worker processes
as in the main bench (each with its own channel, like ``CoordinatorClient``),
each doing Sync(r) then Commit(r) for R rounds. Latency as in the main bench:
per round, the Sync call that started last, call start -> reply.

What it tells: the part of the coordinator's quorum latency that gRPC Python
itself costs on this machine with N peers' processes sharing its CPUs.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import threading
import time
import traceback
from typing import Dict, List

SERVICE = "dtrainbench.Floor"


def _ident(b: bytes) -> bytes:
    return b


def server_main(n: int, port_q) -> None:
    import grpc

    async def run() -> None:
        waiting: Dict[tuple, list] = {}

        def barrier(kind: str):
            async def handler(request: bytes, context) -> bytes:
                key = (kind, request)
                calls = waiting.setdefault(key, [])
                fut = asyncio.get_running_loop().create_future()
                calls.append(fut)
                if len(calls) == n:
                    for f in waiting.pop(key):
                        f.set_result(None)
                await fut
                return request

            return handler

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Sync": grpc.unary_unary_rpc_method_handler(barrier("sync"), _ident, _ident),
                        "Commit": grpc.unary_unary_rpc_method_handler(barrier("commit"), _ident, _ident),
                    },
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(run())


def worker_main(port: int, peers: int, rounds: int, out) -> None:
    import grpc

    try:
        records: List[tuple] = []
        lock = threading.Lock()

        def peer() -> None:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            sync = channel.unary_unary(f"/{SERVICE}/Sync", _ident, _ident)
            commit = channel.unary_unary(f"/{SERVICE}/Commit", _ident, _ident)
            for r in range(rounds):
                t0 = time.monotonic()
                sync(str(r).encode(), timeout=300)
                t1 = time.monotonic()
                commit(str(r).encode(), timeout=300)
                with lock:
                    records.append((r, t0, t1))
            channel.close()

        threads = [threading.Thread(target=peer, daemon=True) for _ in range(peers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.put(("ok", records))
    except Exception:
        out.put(("error", traceback.format_exc()))


def measure(n: int, groups: List[int], rounds: int, warmup: int, timeout: float = 600.0) -> List[float]:
    """Per-round latency (ms) of the last Sync, with ``n`` peers split over processes as ``groups``."""
    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=server_main, args=(n, port_q), daemon=True, name="floor-server")
    server.start()
    procs = []
    try:
        port = port_q.get(timeout=60)
        procs = [
            ctx.Process(target=worker_main, args=(port, g, warmup + rounds, out), daemon=True, name=f"floor-peers-{i}")
            for i, g in enumerate(groups)
            if g
        ]
        for p in procs:
            p.start()
        records: List[tuple] = []
        deadline = time.monotonic() + timeout
        for _ in procs:
            try:
                tag, payload = out.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("the gRPC floor run did not finish in time") from None
            if tag == "error":
                raise RuntimeError(f"a gRPC floor worker failed:\n{payload}")
            records += payload
        lat = []
        for r in range(warmup, warmup + rounds):
            last = max((rec for rec in records if rec[0] == r), key=lambda rec: rec[1])
            lat.append(1000.0 * (last[2] - last[1]))
        return lat
    finally:
        for p in procs + [server]:
            if p.is_alive():
                p.kill()
            p.join(5.0)
