"""Running a Hydra app with one-line errors.

Every console script is a Hydra app over ``conf/``. Before Hydra runs, the
overrides are composed once here so that a user mistake (unknown key, wrong
type, unknown group option, bad value) ends with ONE line on stderr naming
the key, the bad value and what is allowed, and exit status 2 — never a
traceback. Flags (``--help``, ``--cfg``, ``-m`` ...) go to Hydra untouched.

The same holds for output locations: each script names the keys it writes to
(``outputs``), and those keys plus the ``hydra.run.dir`` that Hydra makes
before the app runs are tried before any work; a path that cannot be created
or written is one line naming the key, the path and why, exit status 2. A
failure at the real creation (a race) gets the same line.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import sys
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

USER_ERRORS: tuple = ()

# (key, path, kind): an output location of a script; kind "dir" (a directory it makes and writes into)
# or "file" (a file it writes; its directory is made)
Output = Tuple[str, str, str]


def _user_errors() -> tuple:
    from ..errors import (  # no torch import for a bad argument
        ArchError,
        ConfigError,
        DataError,
    )

    return (ConfigError, DataError, ArchError)


def conf_dir() -> str:
    """The Hydra config tree: $DTRAIN_CONF_DIR, else conf/ beside the package."""
    env = os.environ.get("DTRAIN_CONF_DIR")
    if env:
        return os.path.abspath(env)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "conf")


def fail(prog: str, message: str, code: int = 2) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def describe_error(ex: BaseException) -> str:
    """One line for a Hydra / OmegaConf / dtrain configuration error."""
    from omegaconf.errors import OmegaConfBaseException

    cause = ex
    while not isinstance(cause, OmegaConfBaseException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        return _describe_omegaconf(cause)
    msg = str(ex).strip()
    m = re.search(
        r"Could not find '([^']+)'.*?Available options in '([^']+)':\s*(.*?)(?:Config search path|$)", msg, re.S
    )
    if m:
        opts = [o.strip() for o in m.group(3).split() if o.strip() and not o.startswith("schema")]
        return f"no config {m.group(1)!r}: available options in {m.group(2)!r} are {', '.join(opts)}"
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _describe_omegaconf(ex) -> str:
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
    )

    key = getattr(ex, "full_key", None) or ""
    first = str(getattr(ex, "msg", ex)).strip().splitlines()[0]
    if isinstance(ex, MissingMandatoryValue):
        return f"{key or 'a key'} is not set: give it on the command line ({key}=...)"
    if isinstance(ex, (ConfigKeyError, ConfigAttributeError)) and "not in" in first:
        obj = getattr(ex, "object_type", None)
        allowed = ""
        if obj is not None and dataclasses.is_dataclass(obj):
            allowed = ": allowed keys are " + ", ".join(f.name for f in dataclasses.fields(obj))
        return f"unknown config key {key!r}{allowed}"
    return f"{key}: {first}" if key and key not in first else first


def to_object(cfg):
    """The typed config object; ConfigError for keys a schema does not have (e.g. ``+foo=1``)."""
    from omegaconf import DictConfig, ListConfig

    from ..config import ConfigError

    def walk(node, path):
        if isinstance(node, DictConfig):
            typ = OmegaConf.get_type(node)
            if dataclasses.is_dataclass(typ):
                names = [f.name for f in dataclasses.fields(typ)]
                for k in node.keys():
                    if k not in names:
                        raise ConfigError(f"unknown config key {path + str(k)!r}: allowed keys are " + ", ".join(names))
            for k in node.keys():
                walk(node._get_node(k), f"{path}{k}.")
        elif isinstance(node, ListConfig):
            for i, item in enumerate(node._iter_ex(resolve=False)):
                walk(item, f"{path[:-1]}[{i}].")

    walk(cfg, "")
    return OmegaConf.to_object(cfg)


def _preflight(config_name: str, overrides: List[str], prog: str, outputs: Optional[Callable]) -> List[Output]:
    """Compose and check the config, then try its output locations; the locations, for later errors."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict, read_write

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            run_dir = _hydra_run_dir(cfg)
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            obj = to_object(cfg)
    except _user_errors() as ex:
        fail(prog, str(ex))
    except Exception as ex:  # hydra / omegaconf composition errors
        fail(prog, describe_error(ex))
    finally:
        GlobalHydra.instance().clear()
    outs = list(outputs(obj)) if outputs else []
    checks = [(key, path, kind, True) for key, path, kind in outs]
    if run_dir is not None:
        key, path, writes = run_dir
        if (key, path, "dir") not in outs:
            checks.append((key, path, "dir", writes))
            outs.append((key, path, "dir"))
    check_outputs(prog, checks)
    return outs


def _hydra_run_dir(cfg) -> Optional[Tuple[str, str, bool]]:
    """(the key naming it, the path, whether Hydra writes into it) of the directory Hydra makes; None
    when it cannot be resolved here (then the composition check reports the cause)."""
    try:
        node = cfg.hydra.run._get_node("dir")
        raw = node._value()
        m = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        key = m.group(1) if m else "hydra.run.dir"
        path = str(cfg.hydra.run.dir) or "."
        handlers = OmegaConf.select(cfg.hydra, "job_logging.handlers", default=None)
        handlers = OmegaConf.to_container(handlers, resolve=False) if handlers is not None else {}
        writes = cfg.hydra.output_subdir is not None or any(
            isinstance(h, dict) and "filename" in h for h in handlers.values()
        )
        return key, path, writes
    except Exception:
        return None


# --------------------------------------------------------------------------- output locations

_CREATE_ERRNOS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def output_problem(key: str, path: str, kind: str = "dir", write: bool = True) -> Optional[str]:
    """One line saying why ``path``, the value of ``key``, cannot be an output directory (kind "dir")
    or the place of an output file (kind "file"); None when it can.

    Tried for real: the missing directories are made and (``write``) a scratch file is created in
    the directory; everything made is removed again, so a check leaves nothing behind.
    """
    if not path:
        return f"{key} is empty: give a {'directory' if kind == 'dir' else 'file path'}"
    target = os.path.abspath(path)
    if kind == "file" and os.path.isdir(target):
        return f"{key}={path!r} is a directory, not a file"
    d = target if kind == "dir" else os.path.dirname(target)
    missing, top = [], d
    while not os.path.lexists(top):
        missing.append(top)
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        what = "is a file, not a directory" if os.path.isfile(top) else "is not a directory"
        if top == target:
            return f"{key}={path!r} {what}"
        return f"{key}={path!r} cannot be created: {top!r} {what}"
    made: List[str] = []
    try:
        for p in reversed(missing):
            os.mkdir(p)
            made.append(p)
        if write:
            fd, scratch = tempfile.mkstemp(prefix=".dtrain-probe-", dir=d)
            os.close(fd)
            os.unlink(scratch)
    except OSError as e:
        verb = "created" if len(made) < len(missing) else "written"
        return f"{key}={path!r} cannot be {verb}: {e.strerror or e}"
    finally:
        for p in reversed(made):
            try:
                os.rmdir(p)
            except OSError:  # someone else put something there meanwhile: theirs now
                pass
    return None


def check_outputs(prog: str, checks: Sequence[Tuple[str, str, str, bool]]) -> None:
    """``fail`` with the first (key, path, kind, write) that cannot be used (see :func:`output_problem`)."""
    for key, path, kind, write in checks:
        problem = output_problem(key, path, kind, write)
        if problem:
            fail(prog, problem)


def output_error(ex: BaseException, outputs: Sequence[Output]) -> Optional[str]:
    """The one line for an OSError (or an error it caused) met while making or writing one of
    ``outputs``; None when the error is about something else."""
    e: Optional[BaseException] = ex
    for _ in range(8):
        if e is None:
            break
        if isinstance(e, OSError) and e.errno is not None:
            for name in (e.filename, e.filename2):
                if name is None or isinstance(name, int):
                    continue
                f = os.path.abspath(os.fsdecode(name))
                for key, path, kind in outputs:
                    if not path:
                        continue
                    target = os.path.abspath(path)
                    d = target if kind == "dir" else os.path.dirname(target)
                    if (f == target or target.startswith(f.rstrip(os.sep) + os.sep)) and e.errno in _CREATE_ERRNOS:
                        return f"{key}={path!r} cannot be created: {e.strerror}"
                    inside = f.startswith(d.rstrip(os.sep) + os.sep) if kind == "dir" else os.path.dirname(f) == d
                    if inside and e.errno in _WRITE_ERRNOS:
                        return f"{key}={path!r} cannot be written: {e.strerror}: {f!r}"
        e = e.__cause__ or e.__context__
    return None


def run_app(
    prog: str,
    config_name: str,
    task: Callable,
    argv: Optional[List[str]] = None,
    outputs: Optional[Callable[[object], Sequence[Output]]] = None,
) -> None:
    """Compose ``config_name`` with the shell's overrides and run ``task(cfg_object)``.

    ``outputs(cfg_object)`` lists the script's output locations as (key, path, kind) triples.
    """
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    if not os.path.isdir(conf_dir()):
        fail(prog, f"config directory {conf_dir()!r} not found: set DTRAIN_CONF_DIR to dtrain's conf/")
    flags = [a for a in argv if a.startswith("-")]
    checked: Optional[List[Output]] = None
    if not flags:
        checked = _preflight(config_name, list(argv), prog, outputs)
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    started = []

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)
    def _main(cfg) -> None:
        started.append(True)
        _set_env("HYDRA_FULL_ERROR", user_full_error)  # the task's own errors: as Hydra reports them
        outs: Sequence[Output] = []
        try:
            obj = to_object(cfg)
            outs = list(outputs(obj)) if outputs else []
            if checked is None:  # flags (e.g. -m): not tried before Hydra ran
                check_outputs(prog, [(key, path, kind, True) for key, path, kind in outs])
            rc = task(obj)
        except _user_errors() as ex:
            logging.getLogger("dtrain").debug("user error", exc_info=True)
            fail(prog, str(ex))
        except KeyboardInterrupt:
            fail(prog, "interrupted", 130)
        except Exception as ex:  # an output location that could not be made or written after all (a race)
            msg = output_error(ex, outs)
            if msg is None:
                raise
            logging.getLogger("dtrain").debug("output error", exc_info=True)
            fail(prog, msg)
        if rc:
            sys.exit(int(rc))

    sys.argv = [sys.argv[0]] + list(argv)
    if checked is not None:
        # Hydra makes hydra.run.dir and opens its log file there before _main runs, and prints a
        # traceback for an error in that; with HYDRA_FULL_ERROR it raises it to us instead
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): stop quietly
        _quiet_stdout()
        sys.exit(1)
    except Exception as ex:
        if started or checked is None:
            raise
        fail(prog, output_error(ex, checked) or describe_error(ex))
    finally:
        _set_env("HYDRA_FULL_ERROR", user_full_error)


def _set_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
