"""Every default is stated once (the rule at the top of ``dtrain/config.py``).

Two checks over ``conf/``, each listing every offending key at once:

- the default config of every console script, composed as the script composes it,
  equals its dataclass's defaults wherever the dataclass states one (a group the
  dataclass leaves ``???``, like ``model`` and ``data``, is the group file's to fill);
- no YAML file states a key to the value it has without that line: a primary
  config (``conf/<app>.yaml``) states no value at all, a group option or a preset
  states only what it changes. Interpolations (``${now:...}``, ``${oc.env:...}``)
  are the exception: a dataclass cannot hold them.

The last tests inject a disagreement and a restatement into a copy of ``conf/``
and show that the checks name them; the others check the choice registries.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from conftest import CONF, REPO

PRESET_APP = "train"  # `@package _global_` presets (conf/experiment/) apply to dtrain-train: `+experiment=...`


# --------------------------------------------------------------------------- the checks


def _apps():
    from dtrain.cli.config_reference import APPS

    return [name for _, name, _ in APPS]


def _compose(conf_dir: str, name: str, overrides=()) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dtrain.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            return compose(name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _schema(path: str) -> DictConfig:
    """The registered structured config ``schema/...`` (the dataclass's defaults, typed)."""
    from hydra.core.config_store import ConfigStore

    from dtrain.config import register_configs

    register_configs()
    return ConfigStore.instance().load(path.strip("/") + ".yaml").node


def _interpolation(v) -> bool:
    return isinstance(v, str) and "${" in v


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)
    return node._value() if hasattr(node, "_value") else node


def _structured(node) -> bool:
    return (
        isinstance(node, DictConfig)
        and not node._is_missing()
        and not node._is_none()
        and dataclasses.is_dataclass(OmegaConf.get_type(node))
    )


def _owner(node: DictConfig, key: str) -> str:
    typ = OmegaConf.get_type(node)
    return f"{typ.__name__}.{key}" if dataclasses.is_dataclass(typ) else key


def _read(path: str):
    """(body, defaults list, whether the file is `@package _global_`) of one YAML file, unresolved."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    doc = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
    defaults = doc.pop("defaults", [])
    doc.pop("hydra", None)
    return doc, defaults, "@package _global_" in text


def disagreements(conf_dir: str = CONF):
    """``app: key: ...`` for every key where an app's default config differs from its dataclass default."""
    out = []
    for app in _apps():
        _, defaults, _ = _read(os.path.join(conf_dir, f"{app}.yaml"))
        schema = next(e.split("@")[0] for e in defaults if isinstance(e, str) and e.startswith("/schema/"))
        _compare_default(app, _compose(conf_dir, app), _schema(schema), "", out)
    return out


def _compare_default(app, cfg: DictConfig, schema: DictConfig, prefix: str, out) -> None:
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in schema.keys():
            out.append(f"{app}: {path}: not a key of {OmegaConf.get_type(schema).__name__}")
            continue
        got, want = cfg._get_node(key), schema._get_node(key)
        if want._is_missing() and isinstance(got, DictConfig):
            continue  # a group the dataclass leaves to the group file (model, data)
        if _structured(got) and _structured(want):
            _compare_default(app, got, want, path + ".", out)
            continue
        g, w = _plain(got), _plain(want)
        if _interpolation(g) or g == w:
            continue
        if want._is_missing():
            out.append(f"{app}: {path}: conf/ gives {g!r} but {_owner(schema, key)} has no default: state it there")
        else:
            out.append(f"{app}: {path}: conf/ gives {g!r} but {_owner(schema, key)} defaults to {w!r}")


def _full(conf_dir: str, group: str, option: str) -> DictConfig:
    """What a group option file makes of its node: its schema, its parents, then its own body."""
    body, defaults, _ = _read(os.path.join(conf_dir, group, f"{option}.yaml"))
    return OmegaConf.merge(_base(conf_dir, group, defaults), body)


def _base(conf_dir: str, group: str, defaults) -> DictConfig:
    """A file's node before its own body: the schemas and same-group parents named in its defaults list."""
    parts = []
    for e in defaults:
        if isinstance(e, str) and e.startswith("/schema/"):
            parts.append(_schema(e.split("@")[0]))
        elif isinstance(e, str) and e != "_self_":  # a parent option of the same group (sandwich: - default)
            parts.append(_full(conf_dir, group, e))
    assert parts, f"conf/{group}: a defaults list without a schema: {defaults}"
    return OmegaConf.merge(*parts)


def restatements(conf_dir: str = CONF):
    """``conf/<file>: key: ...`` for every key a YAML file states without changing it, or states in a
    primary config at all (a value of a primary config is a default: the dataclass holds it)."""
    out = []
    for root, _, files in os.walk(conf_dir):
        for fname in sorted(files):
            if not fname.endswith(".yaml"):
                continue
            path = os.path.join(root, fname)
            rel = os.path.relpath(path, conf_dir)
            group = os.path.dirname(rel)
            body, defaults, is_global = _read(path)
            if not group:
                _compare_stated(rel, body, _base(conf_dir, "", defaults), "", out, primary=True)
            elif is_global:
                groups = [
                    f"{k.split('/', 1)[1]}={v}"
                    for e in defaults
                    if isinstance(e, dict)
                    for k, v in e.items()
                    if k.startswith("override /")
                ]
                _compare_stated(rel, body, _compose(conf_dir, PRESET_APP, groups), "", out, primary=False)
            else:
                _compare_stated(rel, body, _base(conf_dir, group, defaults), "", out, primary=False)
    return sorted(out)


def _compare_stated(rel, body: dict, base: DictConfig, prefix: str, out, primary: bool) -> None:
    for key, value in body.items():
        path = f"{prefix}{key}"
        if not isinstance(base, DictConfig) or key not in base.keys():
            out.append(f"conf/{rel}: {path}: not a key of its schema")
            continue
        node = base._get_node(key)
        if isinstance(value, dict) and _structured(node):
            _compare_stated(rel, value, node, path + ".", out, primary)
            continue
        if _interpolation(value):
            continue
        before = _plain(node)
        if value == before:
            out.append(f"conf/{rel}: {path}: {value!r} restates {_owner(base, key)}'s default: delete the line")
        elif primary:
            out.append(
                f"conf/{rel}: {path}: {value!r} is a default stated in YAML: "
                f"it belongs in {_owner(base, key)} (now {before!r})"
            )


# --------------------------------------------------------------------------- the rule, enforced


def test_every_console_script_has_its_config_checked():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    from dtrain.cli.config_reference import APPS

    assert sorted(prog for prog, _, _ in APPS) == sorted(scripts)


def test_default_configs_agree_with_the_dataclasses():
    found = disagreements()
    assert not found, "conf/ and dtrain/config.py disagree on a default:\n" + "\n".join(found)


def test_no_yaml_file_restates_a_default():
    found = restatements()
    assert not found, "a default stated twice (see dtrain/config.py's docstring):\n" + "\n".join(found)


def test_the_six_defaults_of_the_issue_are_the_readme_ones():
    """README: "`make train-demo` trains one peer alone for 300 steps of batch 64"; the rest are the
    values users have been running (the composed YAML) and the README's configuration reference."""
    from dtrain.config import OptimConfig, TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert (fields["steps"], fields["batch_size"]) == (300, 64)
    assert (fields["eval_every"], fields["eval_batch_size"], fields["log_every"], fields["checkpoint_every"]) == (
        150,
        512,
        20,
        150,
    )
    assert OptimConfig().warmup_steps == 30
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert "`make train-demo` trains one peer alone for 300 steps of batch 64" in " ".join(f.read().split())


# --------------------------------------------------------------------------- the checks can fail


@pytest.fixture
def conf_copy(tmp_path):
    dst = tmp_path / "conf"
    shutil.copytree(CONF, dst)
    return dst


def _append(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def test_an_injected_disagreement_is_named(conf_copy):
    _append(conf_copy / "train.yaml", "\nsteps: 1000\n")
    _append(conf_copy / "optim" / "adamw.yaml", "\nwarmup_steps: 100\n")
    _append(conf_copy / "sim.yaml", "\nchaos:\n  kill_at_s: [20.0]\n")
    found = disagreements(str(conf_copy))
    assert any(m.startswith("train: steps: conf/ gives 1000 but TrainConfig.steps defaults to 300") for m in found)
    assert any(m.startswith("train: optim.warmup_steps: conf/ gives 100 but OptimConfig.warmup_steps") for m in found)
    assert any(m.startswith("sim: chaos.kill_at_s: conf/ gives [20.0]") for m in found)
    assert len(found) == 3, found
    stated = restatements(str(conf_copy))
    assert any(m.startswith("conf/train.yaml: steps: 1000 is a default stated in YAML") for m in stated)
    assert any(m.startswith("conf/sim.yaml: chaos.kill_at_s: [20.0] is a default stated in YAML") for m in stated)


def test_an_injected_restatement_or_unknown_key_is_named(conf_copy):
    _append(conf_copy / "train.yaml", "\neval_every: 150\n")
    _append(conf_copy / "model" / "mbv3_tiny.yaml", "\nkernel_sizes: [3, 5, 7]\nbn_eps: 1.0e-5\n")
    _append(conf_copy / "sandwich" / "delayed.yaml", "\ndelay_fraction: 0.5\n")
    _append(conf_copy / "experiment" / "gpt_text.yaml", "\nbatch_size: 64\n")
    _append(conf_copy / "model" / "gpt_small.yaml", "\nhead_dims: [16]\n")  # a typo in an option no default uses
    assert disagreements(str(conf_copy)) == []  # same values: nothing users get changes ...
    stated = restatements(str(conf_copy))  # ... but each is a second statement
    assert [m.split(": ")[0] + ": " + m.split(": ")[1] for m in stated] == [
        "conf/experiment/gpt_text.yaml: batch_size",
        "conf/model/gpt_small.yaml: head_dims",
        "conf/model/mbv3_tiny.yaml: bn_eps",
        "conf/model/mbv3_tiny.yaml: kernel_sizes",
        "conf/sandwich/delayed.yaml: delay_fraction",
        "conf/train.yaml: eval_every",
    ], stated


# --------------------------------------------------------------------------- one list per choice


def test_config_validation_imports_no_torch():
    code = (
        "import sys, dtrain.config as c; c.OuterConfig(codec='int8'); "
        "assert 'torch' not in sys.modules, 'dtrain.config imports torch'"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_codec_names_come_from_one_list():
    from dtrain.config import CODEC_NAMES, ConfigError, OuterConfig
    from dtrain.outer import codecs

    assert codecs.CODEC_NAMES is CODEC_NAMES
    assert tuple(codecs._CODECS) == CODEC_NAMES
    assert all(codecs.get_codec(n).name == n for n in CODEC_NAMES)
    assert OuterConfig.__dataclass_fields__["codec"].metadata["choices"] is CODEC_NAMES
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(CODEC_NAMES) + "$"):
        OuterConfig(codec="int2")
    with pytest.raises(ValueError, match="expected one of " + ", ".join(CODEC_NAMES) + "$"):
        codecs.get_codec("int2")


def test_space_names_come_from_one_list():
    from dtrain.config import MODEL_CONFIGS, ConfigError, model_config_from
    from dtrain.supernet import SUPERNETS

    assert set(SUPERNETS) == set(MODEL_CONFIGS.values())
    assert all(cls.space == name for name, cls in MODEL_CONFIGS.items())
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(MODEL_CONFIGS) + "$"):
        model_config_from({"space": "resnet"})


def test_data_source_names_come_from_one_list():
    from dtrain.config import DATA_CONFIGS, ConfigError, data_config_from
    from dtrain.data import DATA_SOURCES, DataError, build_data

    assert set(DATA_SOURCES) == set(DATA_CONFIGS.values())
    assert all(cls.name == name for name, cls in DATA_CONFIGS.items())
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(DATA_CONFIGS) + "$"):
        data_config_from({"name": "imagenet"})

    @dataclasses.dataclass
    class Other:
        name: str = "imagenet"

    with pytest.raises(DataError, match="choose one of " + ", ".join(DATA_CONFIGS) + "$"):
        build_data(Other())


def test_the_reference_lists_the_registries():
    from dtrain.cli.config_reference import render
    from dtrain.config import CODEC_NAMES, DATA_CONFIGS, MODEL_CONFIGS

    doc = render()
    assert "| `outer.codec` | `str` | `fp32` | " + " \\| ".join(CODEC_NAMES) + " |" in doc
    assert "model.space: " + " \\| ".join(MODEL_CONFIGS) in doc
    assert "data.name: " + " \\| ".join(DATA_CONFIGS) in doc
