"""WAN shaping of a peer container's uplink with ``tc netem``, from environment variables.

    NETEM            on | off (default on; off: no shaping at all, e.g. outside a container)
    NETEM_DEV        interface (default eth0)
    NETEM_DELAY_MS   one-way delay added to every packet this container sends (default 0)
    NETEM_JITTER_MS  +- variation of that delay (default 0; needs a delay)
    NETEM_LOSS_PCT   random packet loss, percent (default 0)
    NETEM_RATE_MBIT  uplink rate, Mbit/s (default 0: unlimited)
    NETEM_LIMIT      packets queued by netem (default 10000, so a long delay at a high rate does not drop)

Only egress is shaped: a message from peer A to peer B is delayed by A's settings, the answer by B's.
Where the kernel has no netem (``sch_netem`` not built or not loaded), the uplink gets rate-only shaping
with ``tc ... tbf`` and one warning line says that latency and loss are not emulated; where ``tc``
cannot shape at all (no NET_ADMIN, no iproute2), a warning line says so. The container runs on in
every case. Needs the NET_ADMIN capability (compose: ``cap_add: [NET_ADMIN]``); ``tc`` carries it as a file
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
        raise EnvError(
            f"NETEM_JITTER_MS={env.get('NETEM_JITTER_MS')!r} is not allowed without a delay: set NETEM_DELAY_MS > 0 too"
        )
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


TBF_LATENCY_MS = 200  # tbf: the longest a packet waits in the queue before it is dropped


def tbf_command(env: Mapping[str, str]) -> Optional[List[str]]:
    """The rate-only fallback where the kernel has no netem: ``tc ... tbf``, or None without a rate.

    EnvError for a bad value (the same checks as :func:`netem_command`)."""
    if netem_command(env) is None:
        return None
    rate = number(env, "NETEM_RATE_MBIT", 0.0, unit="Mbit/s; 0: unlimited")
    if not rate:
        return None
    burst = max(16 * 1024, int(rate * 1e6 / 8 / 100))  # 10 ms of traffic at the rate, at least 16 KiB
    dev = text(env, "NETEM_DEV", "eth0")
    return [
        "tc",
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{rate:g}mbit",
        "burst",
        str(burst),
        "latency",
        f"{TBF_LATENCY_MS}ms",
    ]


def _run(cmd: List[str]) -> str:
    """'' when ``cmd`` worked, else why not (one line)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "'tc' is not installed (iproute2)"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]}: {e}"
    if p.returncode == 0:
        return ""
    why = " ".join((p.stderr or p.stdout).split()) or "no message"
    return f"exit {p.returncode}: {why}"


def _not_emulated(env: Mapping[str, str]) -> str:
    delay = number(env, "NETEM_DELAY_MS", 0.0)
    jitter = number(env, "NETEM_JITTER_MS", 0.0)
    loss = number(env, "NETEM_LOSS_PCT", 0.0, hi=100.0)
    return (
        f"latency and loss are not emulated (NETEM_DELAY_MS={delay:g}, NETEM_JITTER_MS={jitter:g}, "
        f"NETEM_LOSS_PCT={loss:g} ignored)"
    )


def apply(env: Mapping[str, str]) -> str:
    """Shape the uplink as well as this host allows; returns one line saying what was done.

    netem when the kernel has it; else rate-only shaping with ``tbf`` and a warning that latency and loss
    are not emulated; else (no ``tc``, no NET_ADMIN) a warning that nothing is shaped. A failed shaping
    never stops the container: the line starts with ``netem: warning:`` instead."""
    cmd = netem_command(env)
    if cmd is None:
        return "netem: no shaping (NETEM=off or every NETEM_* value is 0)"
    why = _run(cmd)
    if not why:
        return "netem: " + " ".join(cmd[3:])
    fix = "cap_add: [NET_ADMIN] and iproute2 in the image; NETEM=off silences this"
    if "not installed" in why:
        return f"netem: warning: no shaping at all: {why}; {_not_emulated(env)}, and no rate is set ({fix})"
    tbf = tbf_command(env)
    if tbf is None:
        return (
            f"netem: warning: no shaping at all: netem failed ({why}) and NETEM_RATE_MBIT=0 leaves nothing "
            f"for tbf; {_not_emulated(env)}"
        )
    tbf_why = _run(tbf)
    if tbf_why:
        return (
            f"netem: warning: no shaping at all: netem failed ({why}), tbf failed ({tbf_why}); "
            f"{_not_emulated(env)}, and no rate is set ({fix})"
        )
    shaping = f"rate-only shaping of {tbf[4]}, {' '.join(tbf[6:])}"
    return f"netem: warning: no netem here ({why}): {shaping}; {_not_emulated(env)}"
