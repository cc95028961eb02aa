"""``dtrain-status``: a coordinator's round, quorum, members and last commits (Hydra app over conf/status.yaml).

    dtrain-status coordinator=127.0.0.1:7070 [tls.ca=certs/ca.pem] [auth.token=...] [json=true]

A failure to get the status (unreachable, TLS, token) is one line on stderr
naming the address, exit status 1; config mistakes exit with status 2.
"""

from __future__ import annotations

import os
import sys

from ..config import ConfigError, register_configs
from .app import run_app

PROG = "dtrain-status"


def _task(cfg) -> int:
    from ..control.status_view import StatusError, show
    from ..wire.auth import resolve_token

    tls = cfg.tls
    for key in ("ca", "cert", "key"):
        path = getattr(tls, key)
        if path:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise ConfigError(f"tls.{key}={path!r} cannot be read: {e.strerror or e}") from None
    try:
        out = show(cfg.coordinator, tls, resolve_token(cfg.auth.token), cfg.timeout_s, cfg.json)
    except StatusError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        print(out, flush=True)
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv=None) -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core would log TLS handshake failures on stderr
    register_configs()
    run_app(PROG, "status", _task, argv)


if __name__ == "__main__":
    main()
