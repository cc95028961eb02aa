"""Container healthcheck: ask a dtrain gRPC server through the standard gRPC health service.

    python docker/healthcheck.py                      # the target the entrypoint wrote ($DTRAIN_HEALTH_FILE)
    python docker/healthcheck.py --address 127.0.0.1:7070 [--tls-ca ca.pem --server-name dtrain]

Exit status: 0 healthy, 1 not (one line on stdout says why), 2 a usage mistake.

- The coordinator and a peer's data plane (the ``Peer`` service) must answer SERVING
  (``grpc.health.v1.Health/Check``; no token needed).
- ``--accept-unimplemented`` also counts a gRPC server without a health service as up (any answer,
  UNIMPLEMENTED included); no answer (refused, TLS failure, timeout) never does.
- A container whose role serves nothing (certs, chaos) is healthy once its role started.

The entrypoint writes the target as JSON: ``{"role", "address", "tls_ca", "server_name",
"accept_unimplemented"}`` (``address`` null: nothing to check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_FILE = "/tmp/dtrain-health.json"


def check(
    address: str,
    tls_ca: str = "",
    server_name: str = "",
    service: str = "",
    timeout: float = 3.0,
    accept_unimplemented: bool = False,
) -> tuple:
    """(ok, one-line reason)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if tls_ca:
        with open(tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(address, creds, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        code = e.code()
        if accept_unimplemented and code == grpc.StatusCode.UNIMPLEMENTED:
            return True, f"{address} answers (no health service: UNIMPLEMENTED)"
        return False, f"{address}: {code.name}: {e.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", help="host:port (default: the target in $DTRAIN_HEALTH_FILE)")
    ap.add_argument("--tls-ca", default="", help="CA of the server certificate (TLS)")
    ap.add_argument("--server-name", default="", help="name expected in the server certificate")
    ap.add_argument("--service", default="", help="health service name (default '': the whole server)")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument(
        "--accept-unimplemented",
        action="store_true",
        help="a server without a health service that answers counts as healthy",
    )
    a = ap.parse_args(argv)
    target = {
        "address": a.address,
        "tls_ca": a.tls_ca,
        "server_name": a.server_name,
        "accept_unimplemented": a.accept_unimplemented,
    }
    if a.address is None:
        path = os.environ.get("DTRAIN_HEALTH_FILE", DEFAULT_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                target = json.load(f)
        except (OSError, ValueError) as e:
            print(f"unhealthy: no target in {path} (the role has not started): {e}")
            return 1
        if not target.get("address"):
            print(f"healthy: role {target.get('role', '?')} serves nothing to check")
            return 0
    if ":" not in target["address"] or target["address"].endswith(":0"):
        print(f"unhealthy: cannot check address {target['address']!r} (host:port with a fixed port)")
        return 1 if a.address is None else 2
    ok, why = check(
        target["address"],
        target.get("tls_ca") or "",
        target.get("server_name") or "",
        a.service,
        a.timeout,
        bool(target.get("accept_unimplemented")),
    )
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
