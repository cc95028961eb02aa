"""WAN shaping of a peer container's uplink with ``tc netem``, from environment variables.

    NETEM            on | off (default on; off: no shaping at all, e.g. outside a container)
    NETEM_DEV        interface (default eth0)
    NETEM_DELAY_MS   one-way delay added to every packet this container sends (default 0)
    NETEM_JITTER_MS  +- variation of that delay (default 0; needs a delay)
    NETEM_LOSS_PCT   random packet loss, percent (default 0)
    NETEM_RATE_MBIT  uplink rate, Mbit/s (default 0: unlimited)
    NETEM_LIMIT      packets queued by netem (default 10000, so a long delay at a high rate does not drop)

Only egress is shaped: a message from peer A to peer B is delayed by A's settings, the answer by B's.
Needs the NET_ADMIN capability (compose: ``cap_add: [NET_ADMIN]``); ``tc`` carries it as a file
capability in the image, so the non-root user can use it.
"""

from __future__ import annotations

import subprocess
from typing import List, Mapping, Optional

from envvars import EnvError, integer, number, switch, text


def netem_command(env: Mapping[str, str]) -> Optional[List[str]]:
    """The ``tc`` command that applies the settings, or None when there is nothing to shape.

    EnvError for a bad value."""
    if not switch(env, "NETEM", True):
        return None
    dev = text(env, "NETEM_DEV", "eth0")
    if not dev.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise EnvError(f"NETEM_DEV={dev!r} is not allowed: an interface name such as eth0")
    delay = number(env, "NETEM_DELAY_MS", 0.0, unit="milliseconds")
    jitter = number(env, "NETEM_JITTER_MS", 0.0, unit="milliseconds")
    loss = number(env, "NETEM_LOSS_PCT", 0.0, hi=100.0, unit="percent")
    rate = number(env, "NETEM_RATE_MBIT", 0.0, unit="Mbit/s; 0: unlimited")
    limit = integer(env, "NETEM_LIMIT", 10000, lo=1)
    if jitter and not delay:
        raise EnvError(f"NETEM_JITTER_MS={env.get('NETEM_JITTER_MS')!r} is not allowed without a delay: "
                       "set NETEM_DELAY_MS > 0 too")
    if not (delay or loss or rate):
        return None
    cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "limit", str(limit)]
    if delay:
        cmd += ["delay", f"{delay:g}ms"] + ([f"{jitter:g}ms"] if jitter else [])
    if loss:
        cmd += ["loss", f"{loss:g}%"]
    if rate:
        cmd += ["rate", f"{rate:g}mbit"]
    return cmd


def apply(env: Mapping[str, str]) -> str:
    """Apply the shaping; returns a one-line description. RuntimeError (one line) when ``tc`` fails."""
    cmd = netem_command(env)
    if cmd is None:
        return "netem: no shaping (NETEM=off or every NETEM_* value is 0)"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise RuntimeError("netem: 'tc' is not installed (install iproute2, or set NETEM=off)") from None
    if p.returncode != 0:
        why = (p.stderr or p.stdout).strip().replace("\n", " ")
        raise RuntimeError(f"netem: {' '.join(cmd)} failed (exit {p.returncode}): {why}; the container needs "
                           "cap_add: [NET_ADMIN] and a kernel with sch_netem (or set NETEM=off)")
    return "netem: " + " ".join(cmd[3:])
