"""Shared test helpers: composing configs, running the CLI, small models."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

# fixtures shared by several test modules (clusters of real processes, the preloaded forkserver)
pytest_plugins = ["proc_fixtures", "control_fixtures", "outer_fixtures"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "conf")
VENV_BIN = os.path.dirname(sys.executable)


def sigint_default() -> None:
    """Popen ``preexec_fn`` for tests that send SIGINT: the child gets SIGINT's default action back. A shell
    that starts a job in the background (``make test &``, some CI runners) hands SIGINT down ignored, and
    a signal ignored at exec can be neither trapped by bash nor turned into KeyboardInterrupt by Python."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Undo root-logger handlers a test installed (an in-process Hydra app adds a console handler on the
    test's captured stdout): left behind, a later test's log line would hit that closed stream."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in before and not type(h).__module__.startswith("_pytest"):
            root.removeHandler(h)
    root.setLevel(level)


# a small, fast mbv3 space for unit and integration tests
FAST_MBV3 = [
    "model.stem_channels=8",
    "model.stages=[{channels:8,stride:1,act:relu,se:false},{channels:16,stride:2,act:hswish,se:true}]",
    "model.final_expand=2",
    "model.feature_dim=32",
    "model.depths=[1,2]",
    "model.kernel_sizes=[3,5]",
    "model.expand_ratios=[2,3]",
    "model.resolutions=[8,12]",
    "model.dropout=0.1",
]
FAST_TRAIN = [
    "batch_size=16",
    "eval_batch_size=128",
    "calib_batches=2",
    "calib_batch_size=16",
    "log_every=1",
    "logger.progress=off",
]


def compose(overrides=(), config_name="train"):
    """A TrainConfig (or another schema object) composed like the CLI does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dtrain.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return OmegaConf.to_object(cfg)


def fast_cfg(tmp_path, *overrides, name="run"):
    return compose([f"run_dir={tmp_path / name}", *FAST_MBV3, *FAST_TRAIN, *overrides])


def run_cli(args, timeout=120, env=None, cwd=None):
    """Run a console script of this venv; returns CompletedProcess (text)."""
    exe = os.path.join(VENV_BIN, args[0])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [exe, *args[1:]], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO
    )


@pytest.fixture
def tiny_mbv3_cfg():
    from dtrain.config import MBV3Config, StageConfig

    return MBV3Config(
        in_channels=1,
        num_classes=10,
        stem_channels=8,
        stem_stride=1,
        stages=[StageConfig(8, 1, "relu", False), StageConfig(16, 2, "hswish", True)],
        final_expand=2,
        feature_dim=32,
        kernel_sizes=[3, 5, 7],
        expand_ratios=[2, 3],
        depths=[1, 2],
        resolutions=[8, 12],
        dropout=0.1,
    )


def stop_servers(servers) -> None:
    """Stop gRPC servers at once (no grace) and wait until each is down."""
    for done in [s.stop(0) for s in servers]:
        done.wait(10)


@pytest.fixture
def served():
    """Start Peer gRPC servers (``served(servicer) -> address``) on 127.0.0.1:0; all stopped at teardown."""
    servers = []

    def start(servicer, token=""):
        from dtrain.comm.peer_service import serve_peer

        server, port = serve_peer(servicer, token=token)
        servers.append(server)
        return f"127.0.0.1:{port}"

    try:
        yield start
    finally:
        stop_servers(servers)
