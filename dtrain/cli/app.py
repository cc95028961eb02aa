"""Running a Hydra app with one-line errors.

Every console script is a Hydra app over ``conf/``. Before Hydra runs, the
overrides are composed once here so that a user mistake (unknown key, wrong
type, unknown group option, bad value) ends with ONE line on stderr naming
the key, the bad value and what is allowed, and exit status 2 — never a
traceback. Flags (``--help``, ``--cfg``, ``-m`` ...) go to Hydra untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from typing import Callable, List, Optional

from omegaconf import OmegaConf

USER_ERRORS: tuple = ()


def _user_errors() -> tuple:
    from ..errors import ArchError, ConfigError, DataError  # no torch import for a bad argument

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
    m = re.search(r"Could not find '([^']+)'.*?Available options in '([^']+)':\s*(.*?)(?:Config search path|$)",
                  msg, re.S)
    if m:
        opts = [o.strip() for o in m.group(3).split() if o.strip() and not o.startswith("schema")]
        return f"no config {m.group(1)!r}: available options in {m.group(2)!r} are {', '.join(opts)}"
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _describe_omegaconf(ex) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

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
                        raise ConfigError(f"unknown config key {path + str(k)!r}: allowed keys are "
                                          + ", ".join(names))
            for k in node.keys():
                walk(node._get_node(k), f"{path}{k}.")
        elif isinstance(node, ListConfig):
            for i, item in enumerate(node._iter_ex(resolve=False)):
                walk(item, f"{path[:-1]}[{i}].")

    walk(cfg, "")
    return OmegaConf.to_object(cfg)


def _preflight(config_name: str, overrides: List[str], prog: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
            to_object(cfg)
    except _user_errors() as ex:
        fail(prog, str(ex))
    except Exception as ex:  # hydra / omegaconf composition errors
        fail(prog, describe_error(ex))
    finally:
        GlobalHydra.instance().clear()


def run_app(prog: str, config_name: str, task: Callable, argv: Optional[List[str]] = None) -> None:
    """Compose ``config_name`` with the shell's overrides and run ``task(cfg_object)``."""
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    if not os.path.isdir(conf_dir()):
        fail(prog, f"config directory {conf_dir()!r} not found: set DTRAIN_CONF_DIR to dtrain's conf/")
    flags = [a for a in argv if a.startswith("-")]
    if not flags:
        _preflight(config_name, list(argv), prog)

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)
    def _main(cfg) -> None:
        try:
            obj = to_object(cfg)
            rc = task(obj)
        except _user_errors() as ex:
            logging.getLogger("dtrain").debug("user error", exc_info=True)
            fail(prog, str(ex))
        except KeyboardInterrupt:
            fail(prog, "interrupted", 130)
        if rc:
            sys.exit(int(rc))

    sys.argv = [sys.argv[0]] + list(argv)
    try:
        _main()
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): stop quietly
        _quiet_stdout()
        sys.exit(1)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
