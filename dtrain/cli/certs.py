"""``dtrain-certs``: a CA, the coordinator's certificate, per-peer and tool identities (Hydra app over conf/certs.yaml).

    DTRAIN_SECRET=... dtrain-certs out_dir=certs hosts=[coord.example.org,10.0.0.5] clients=[peer-a,peer-b]

Writes the CA, the coordinator's server certificate, one certificate per peer
id (``clients``) and per tool (``tools``, default ``status``), and, when the
cluster secret is set (``DTRAIN_SECRET``, never on a command line), one
identity token per peer and tool (``<name>.token``). Prints the files it
wrote and the config keys that use them. Writes nothing in the current
directory besides ``out_dir`` (no Hydra output or log files).
"""

from __future__ import annotations

import sys

from ..config import ConfigError, register_configs
from .app import output_error, run_app

PROG = "dtrain-certs"


def usage(files) -> str:
    """The lines telling which config keys take which file."""
    lines = []
    if files.ca_cert:
        lines += [
            f"coordinator (TLS):        tls.cert={files.server_cert} tls.key={files.server_key}",
            f"coordinator (mutual TLS): add tls.client_ca={files.ca_cert} (binds each call to its certificate's id)",
            f"peers, dtrain-status:     tls.ca={files.ca_cert}",
        ]
        for name, (cert, key) in files.clients.items():
            lines.append(f"  + under mutual TLS, peer {name!r}: control.tls.cert={cert} control.tls.key={key}")
        for name, (cert, key) in files.tools.items():
            lines.append(f"  + under mutual TLS, tool {name!r}: tls.cert={cert} tls.key={key}")
    if files.tokens:
        lines.append("identity tokens: the coordinator takes the secret (DTRAIN_SECRET or auth.secret); hand each")
        lines.append("  machine only its own token file: DTRAIN_TOKEN=$(cat <file>) or DTRAIN_TOKEN_FILE=<file>")
    return "\n".join(lines)


def _task(cfg) -> int:
    from ..control.certs import CertsError, generate
    from ..wire.auth import resolve_secret

    try:
        files = generate(
            cfg.out_dir,
            list(cfg.hosts),
            list(cfg.clients),
            cfg.days,
            cfg.overwrite,
            tools=list(cfg.tools),
            peer_hosts=list(cfg.peer_hosts),
            secret=resolve_secret(cfg.secret),
            certificates=cfg.certificates,
        )
    except CertsError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:  # an existing file, or an unwritable out_dir
        unwritable = output_error(e, outputs(cfg))
        if unwritable:
            raise ConfigError(unwritable) from None
        msg = str(e) if isinstance(e, FileExistsError) else f"cannot write to {cfg.out_dir!r}: {e.strerror or e}"
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
        return 1
    if files.ca_cert:
        print(f"wrote CA:     {files.ca_cert} (key {files.ca_key}, keep it private)")
        print(f"wrote server: {files.server_cert} (key {files.server_key}) for {', '.join(map(str, cfg.hosts))}")
    for name, (cert, key) in files.clients.items():
        print(f"wrote peer:   {cert} (key {key}) as peer {name!r}")
    for name, (cert, key) in files.tools.items():
        print(f"wrote tool:   {cert} (key {key}) as tool {name!r} (Status only)")
    for name, path in files.tokens.items():
        print(f"wrote token:  {path} for {'tool' if name in cfg.tools else 'peer'} {name!r}")
    print(usage(files), flush=True)
    return 0


def outputs(cfg):
    return [("out_dir", cfg.out_dir, "dir")]


def main(argv=None) -> None:
    register_configs()
    run_app(PROG, "certs", _task, argv, outputs=outputs)


if __name__ == "__main__":
    main()
