"""``dtrain-certs``: a self-signed CA plus server and client certificates (Hydra app over conf/certs.yaml).

    dtrain-certs out_dir=certs hosts=[coord.example.org,10.0.0.5] clients=[client,peer1]

Prints the files it wrote and the config keys that use them. Writes nothing
in the current directory besides ``out_dir`` (no Hydra output or log files).
"""

from __future__ import annotations

import sys

from ..config import ConfigError, register_configs
from .app import output_error, run_app

PROG = "dtrain-certs"


def usage(files) -> str:
    """The lines telling which config keys take which file."""
    lines = [
        f"coordinator (TLS):        tls.cert={files.server_cert} tls.key={files.server_key}",
        f"coordinator (mutual TLS): add tls.client_ca={files.ca_cert}",
        f"peers, dtrain-status:     tls.ca={files.ca_cert}",
    ]
    for name, (cert, key) in files.clients.items():
        lines.append(f"  + under mutual TLS, as {name!r}: tls.cert={cert} tls.key={key}")
    return "\n".join(lines)


def _task(cfg) -> int:
    from ..control.certs import CertsError, generate

    try:
        files = generate(cfg.out_dir, list(cfg.hosts), list(cfg.clients), cfg.days, cfg.overwrite)
    except CertsError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:  # an existing file, or an unwritable out_dir
        unwritable = output_error(e, outputs(cfg))
        if unwritable:
            raise ConfigError(unwritable) from None
        msg = str(e) if isinstance(e, FileExistsError) else f"cannot write to {cfg.out_dir!r}: {e.strerror or e}"
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
        return 1
    print(f"wrote CA:     {files.ca_cert} (key {files.ca_key}, keep it private)")
    print(f"wrote server: {files.server_cert} (key {files.server_key}) for {', '.join(map(str, cfg.hosts))}")
    for name, (cert, key) in files.clients.items():
        print(f"wrote client: {cert} (key {key}) as {name!r}")
    print(usage(files), flush=True)
    return 0


def outputs(cfg):
    return [("out_dir", cfg.out_dir, "dir")]


def main(argv=None) -> None:
    register_configs()
    run_app(PROG, "certs", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
