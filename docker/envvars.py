"""Reading settings from environment variables, with one-line errors that name the variable.

Used by the container's entrypoint, netem shaping and the chaos service (standard library only).
A bad value raises :class:`EnvError`: ``NAME='value' is not allowed: what is allowed``.
"""

from __future__ import annotations

from typing import Iterable, List, Mapping, Optional, Tuple


class EnvError(ValueError):
    """An environment variable holds a value that is not allowed. The message is one line."""


def _bad(name: str, value: str, allowed: str) -> EnvError:
    return EnvError(f"{name}={value!r} is not allowed: {allowed}")


def text(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, "").strip() or default


def number(
    env: Mapping[str, str], name: str, default: float, lo: float = 0.0, hi: Optional[float] = None, unit: str = ""
) -> float:
    """A number in [lo, hi]; the default when unset or empty."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    span = f">= {lo:g}" if hi is None else f"in {lo:g}..{hi:g}"
    allowed = f"a number {span}" + (f" ({unit})" if unit else "")
    try:
        v = float(raw)
    except ValueError:
        raise _bad(name, raw, allowed) from None
    if not (v == v) or v < lo or (hi is not None and v > hi) or v in (float("inf"), float("-inf")):
        raise _bad(name, raw, allowed)
    return v


def integer(env: Mapping[str, str], name: str, default: int, lo: int = 0, hi: Optional[int] = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    try:
        v = int(raw)
    except ValueError:
        raise _bad(name, raw, allowed) from None
    if v < lo or (hi is not None and v > hi):
        raise _bad(name, raw, allowed)
    return v


def choice(env: Mapping[str, str], name: str, default: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    v = env.get(name, "").strip().lower() or default
    if v not in choices:
        raise _bad(name, v, "choose one of " + ", ".join(choices))
    return v


def switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """on/off, true/false, 1/0, yes/no."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise _bad(name, raw, "on or off")


def interval(env: Mapping[str, str], name: str, default: Tuple[float, float]) -> Tuple[float, float]:
    """``[X,Y]``, ``X,Y`` or ``X`` seconds, with 0 < X <= Y."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    allowed = "[X,Y] seconds with 0 < X <= Y (or one number X)"
    body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        parts = [float(p) for p in body.split(",")]
    except ValueError:
        raise _bad(name, raw, allowed) from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not (0 < parts[0] <= parts[1]) or parts[1] == float("inf"):
        raise _bad(name, raw, allowed)
    return parts[0], parts[1]


def words(env: Mapping[str, str], name: str) -> List[str]:
    """A shell-like list (``a=1 'b=x y'``) split with shlex."""
    import shlex

    raw = env.get(name, "")
    try:
        return shlex.split(raw)
    except ValueError as e:
        raise _bad(name, raw, f"shell words ({e})") from None


def hostport(env: Mapping[str, str], name: str, default: str) -> str:
    v = env.get(name, "").strip() or default
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise _bad(name, v, "host:port")
    return v
