"""Output locations a console script cannot create or write: one line naming the key, exit 2, no traceback.

Every script's output keys (and the hydra.run.dir Hydra makes before the app runs) are tried before
any work; an error at the real creation (a race) gets the same one line.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest

from conftest import REPO, run_cli

FORBIDDEN = "/proc/forbidden/x"  # /proc refuses new entries, even to root


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def _one_line(err: str, prog: str, *want: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    for w in want:
        assert w in lines[0], (w, err)
    return lines[0]


# --------------------------------------------------------------------------- each console script, as a process
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "prog,args,key,bad,why",
    [
        ("dtrain-train", [], "run_dir", FORBIDDEN, "No such file or directory"),
        ("dtrain-coordinator", [], "state_dir", "{tmp}/afile/x", "'{tmp}/afile' is a file, not a directory"),
        ("dtrain-status", ["coordinator=127.0.0.1:1"], "hydra.run.dir", FORBIDDEN, "No such file or directory"),
        ("dtrain-certs", [], "out_dir", "{tmp}/afile", "is a file, not a directory"),
        ("dtrain-sim", [], "run_dir", FORBIDDEN, "No such file or directory"),
        ("dtrain-search", ["checkpoint={tmp}"], "out_dir", "/sys", "cannot be written"),
        ("dtrain-export", ["checkpoint={tmp}", "arch={tmp}/a.json"], "out_dir", "{tmp}/afile/x", "is a file"),
        ("dtrain-latency", [], "out", FORBIDDEN + "/latency.json", "No such file or directory"),
        ("dtrain-report", ["run_dir={tmp}"], "out_dir", FORBIDDEN, "No such file or directory"),
    ],
)
def test_console_script_refuses_an_unusable_output(prog, args, key, bad, why, tmp_path):
    tmp = tmp_path / "t"
    cwd = tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    (tmp / "afile").write_text("x")
    (tmp / "a.json").write_text("{}")
    bad, why = bad.format(tmp=tmp), why.format(tmp=tmp)
    before = _tree(tmp_path)
    p = run_cli(
        [prog, *[a.format(tmp=tmp) for a in args], f"{key}={bad}"],
        timeout=100,
        cwd=str(cwd),
        env={"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    _one_line(p.stderr, prog, f"{key}={bad!r}", why)
    assert _tree(tmp_path) == before  # no run dir, no .hydra, no log, no probe left anywhere
    assert not os.path.exists(os.path.dirname(FORBIDDEN))


# --------------------------------------------------------------------------- the check itself
def test_output_problem_names_key_path_and_reason(tmp_path):
    from dtrain.cli.app import output_problem

    (tmp_path / "afile").write_text("x")
    f = str(tmp_path / "afile")
    assert output_problem("run_dir", FORBIDDEN) == f"run_dir='{FORBIDDEN}' cannot be created: No such file or directory"
    assert output_problem("out_dir", f) == f"out_dir='{f}' is a file, not a directory"
    assert (
        output_problem("out_dir", f + "/a/b")
        == f"out_dir='{f}/a/b' cannot be created: '{f}' is a file, not a directory"
    )
    assert (
        output_problem("out", f + "/t.json", "file")
        == f"out='{f}/t.json' cannot be created: '{f}' is a file, not a directory"
    )
    assert output_problem("out", str(tmp_path), "file") == f"out='{tmp_path}' is a directory, not a file"
    assert output_problem("out_dir", "/dev/null") == "out_dir='/dev/null' is not a directory"
    assert output_problem("state_dir", "/sys").startswith("state_dir='/sys' cannot be written: ")
    assert output_problem("state_dir", "/sys", write=False) is None  # it exists: only written into when asked
    assert output_problem("run_dir", "") == "run_dir is empty: give a directory"
    assert output_problem("out", "", "file") == "out is empty: give a file path"
    # usable: tried for real and left as it was
    assert output_problem("run_dir", str(tmp_path / "new" / "deep")) is None
    assert output_problem("out", str(tmp_path / "n2" / "t.json"), "file") is None
    assert output_problem("run_dir", str(tmp_path)) is None
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_output_error_matches_only_its_locations(tmp_path):
    from dtrain.cli.app import output_error

    outs = [("run_dir", "/r/run", "dir"), ("out", "/o/t.json", "file")]
    enoent = lambda name: FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)  # noqa: E731
    eacces = lambda name: PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)  # noqa: E731
    assert output_error(enoent("/r"), outs) == "run_dir='/r/run' cannot be created: No such file or directory"
    assert (
        output_error(eacces("/r/run/train.log"), outs)
        == "run_dir='/r/run' cannot be written: Permission denied: '/r/run/train.log'"
    )
    assert output_error(eacces("/o/.tmp-123"), outs).startswith("out='/o/t.json' cannot be written")
    assert output_error(enoent("/o"), outs).startswith("out='/o/t.json' cannot be created")
    try:  # logging.config wraps the OSError of a log file it cannot open
        try:
            raise eacces("/r/run/x.log")
        except OSError as e:
            raise ValueError("Unable to configure handler 'file'") from e
    except ValueError as ex:
        assert output_error(ex, outs).startswith("run_dir='/r/run' cannot be written")
    assert output_error(enoent("/r/run/checkpoints/latest.pt"), outs) is None  # reading a missing file
    assert output_error(eacces("/elsewhere/x"), outs) is None
    assert output_error(ValueError("x"), outs) is None
    assert output_error(FileExistsError("ca.pem exists: refusing to overwrite it"), outs) is None


# --------------------------------------------------------------------------- every key, in-process
def _fails(capsys, main, argv, prog, *want):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    return _one_line(err, prog, *want)


@pytest.mark.timeout(120)
def test_every_output_key(tmp_path, capsys, monkeypatch):
    from dtrain.cli import (
        certs,
        coordinator,
        export,
        latency,
        report,
        search,
        sim,
        status,
        train,
    )

    monkeypatch.setattr(sys, "argv", ["dtrain"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "afile").write_text("x")
    f = str(tmp_path / "afile")
    cases = [
        (train, ["run_dir=/sys"], "dtrain-train", "run_dir='/sys' cannot be written"),
        (train, [f"hydra.run.dir={f}"], "dtrain-train", f"hydra.run.dir='{f}' is a file"),
        (coordinator, [f"state_dir={FORBIDDEN}"], "dtrain-coordinator", f"state_dir='{FORBIDDEN}' cannot be"),
        (status, ["coordinator=127.0.0.1:1", f"hydra.run.dir={f}/x"], "dtrain-status", "hydra.run.dir="),
        (certs, [f"out_dir={FORBIDDEN}"], "dtrain-certs", f"out_dir='{FORBIDDEN}' cannot be created"),
        (sim, [f"run_dir={f}"], "dtrain-sim", f"run_dir='{f}' is a file"),
        (search, [f"checkpoint={tmp_path}", f"out_dir={FORBIDDEN}"], "dtrain-search", "out_dir="),
        (export, [f"checkpoint={tmp_path}", f"arch={f}", f"out_dir={f}"], "dtrain-export", "out_dir="),
        (latency, ["out=/sys/latency.json"], "dtrain-latency", "out='/sys/latency.json' cannot be written"),
        (latency, [f"out={tmp_path}"], "dtrain-latency", "is a directory, not a file"),
        (report, [f"run_dir={tmp_path}", f"out_dir={f}/r"], "dtrain-report", f"out_dir='{f}/r' cannot be created"),
    ]
    for mod, argv, prog, want in cases:
        _fails(capsys, mod.main, argv, prog, want)
    assert sorted(os.listdir(tmp_path)) == ["afile", "run"]


@pytest.mark.timeout(120)
def test_report_default_out_dir_is_checked(tmp_path, capsys, monkeypatch):
    from dtrain.cli import report

    monkeypatch.setattr(sys, "argv", ["dtrain-report"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report").write_text("x")  # where the report would go
    _fails(
        capsys,
        report.main,
        [f"run_dir={tmp_path / 'run'}"],
        "dtrain-report",
        f"out_dir='{tmp_path / 'run' / 'report'}' is a file, not a directory",
    )


# --------------------------------------------------------------------------- a race: the check passed, creation fails
@pytest.mark.timeout(120)
def test_failure_at_creation_is_one_line_too(tmp_path, capsys, monkeypatch):
    import dtrain.cli.app as app
    from dtrain.cli import certs, coordinator, report, train

    monkeypatch.setattr(app, "output_problem", lambda *a, **k: None)  # as if it changed after the check
    monkeypatch.setattr(sys, "argv", ["dtrain"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss": {"max": 2.0}}) + "\n")
    # Hydra making the run dir, and opening its log file there, before the app runs
    _fails(
        capsys,
        train.main,
        [f"run_dir={FORBIDDEN}"],
        "dtrain-train",
        f"run_dir='{FORBIDDEN}' cannot be created: No such file or directory",
    )
    _fails(
        capsys,
        coordinator.main,
        ["state_dir=/sys"],
        "dtrain-coordinator",
        "state_dir='/sys' cannot be written: ",
        "/sys/coordinator.log",
    )
    assert "HYDRA_FULL_ERROR" not in os.environ
    # the app making it
    _fails(capsys, certs.main, [f"out_dir={FORBIDDEN}"], "dtrain-certs", f"out_dir='{FORBIDDEN}' cannot be created")
    _fails(
        capsys,
        report.main,
        [f"run_dir={run}", f"out_dir={FORBIDDEN}"],
        "dtrain-report",
        f"out_dir='{FORBIDDEN}' cannot be created",
    )
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(run) == ["metrics.jsonl"]


@pytest.mark.timeout(120)
def test_multirun_checks_in_the_job(tmp_path, capsys, monkeypatch):
    from dtrain.cli import train

    monkeypatch.setattr(sys, "argv", ["dtrain-train"])
    monkeypatch.chdir(tmp_path)
    _fails(
        capsys, train.main, ["-m", f"run_dir={FORBIDDEN}"], "dtrain-train", f"run_dir='{FORBIDDEN}' cannot be created"
    )
