"""The README's configuration reference, generated from the structured configs.

For each console script, its config is composed from ``conf/`` exactly as the
script composes it; every leaf key is listed with its type (from the
dataclass in ``dtrain/config.py``), its default (the composed config: the
dataclass's default unless a chosen group option changes it) and the comment
written beside the field in ``config.py`` (plus the registry's names for a
field with ``metadata["choices"]``). Config groups list
their options (the files under ``conf/<group>/``).

    python -m dtrain.cli.config_reference            # print the markdown
    python -m dtrain.cli.config_reference --write    # replace the README's section (make docs)

``tests/test_config_reference.py`` fails when the README's section is stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
from typing import Dict, List, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from .app import conf_dir

# (console script, config name, what it is for)
APPS = [
    ("dtrain-train", "train", "one peer trains the supernet"),
    ("dtrain-coordinator", "coordinator", "the control plane"),
    ("dtrain-sim", "sim", "a local multi-peer simulation over an emulated WAN"),
    ("dtrain-search", "search", "evolutionary search of a trained supernet"),
    ("dtrain-export", "export", "one subnet as a standalone model"),
    ("dtrain-latency", "latency", "latency table of a space's blocks"),
    ("dtrain-report", "report", "plots and report.md of a run"),
    ("dtrain-status", "status", "a coordinator's state"),
    ("dtrain-certs", "certs", "TLS certificates and identity tokens: the coordinator's, one per peer id, tools'"),
]
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _field_comments(cls) -> Dict[str, str]:
    """field name -> the comment written beside it in the dataclass source, then the names of the
    registry its value comes from (``metadata["choices"]``: codecs, spaces, data sources)."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^    (\w+): [^#]*?(?:\s+#\s*(.*))?$", line)
        if m and m.group(2):
            out[m.group(1)] = m.group(2).strip()
    for f in dataclasses.fields(cls):
        if "choices" in f.metadata:
            names = " | ".join(map(str, f.metadata["choices"]))
            out[f.name] = f"{out[f.name]}: {names}" if out.get(f.name) else names
    return out


def _compose(name: str, overrides=()) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            return compose(name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _value(node) -> str:
    if isinstance(node, (DictConfig, ListConfig)):
        return json.dumps(OmegaConf.to_container(node, resolve=False), separators=(",", ":"))
    if node is None:
        return "null"
    if isinstance(node, str):
        return '""' if node == "" else node
    return json.dumps(node)


def _rows(node: DictConfig, prefix: str, groups: Dict[str, Tuple[List[str], str]]) -> List[List[str]]:
    typ = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else {}
    comments = _field_comments(typ) if fields else {}
    rows = []
    for key in node.keys():
        path = f"{prefix}{key}"
        child = node._get_node(key)
        if (
            isinstance(child, DictConfig)
            and child._is_missing() is False
            and child._is_none() is False
            and dataclasses.is_dataclass(OmegaConf.get_type(child))
        ):
            if path in groups:
                rows.append(_group_row(path, groups[path], comments.get(key, "")))
            rows += _rows(child, path + ".", groups)
            continue
        kind = str(fields[key].type) if key in fields else ""
        raw = OmegaConf.to_container(node, resolve=False)[key]
        val = (
            "???"
            if raw == "???"
            else _value(child._value() if not isinstance(child, (DictConfig, ListConfig)) else child)
        )
        if path in groups:  # a group with no option chosen by default (data: null)
            rows.append(_group_row(path, groups[path], comments.get(key, "")))
            continue
        rows.append(
            [
                f"`{path}`",
                f"`{kind}`" if kind else "",
                f"`{val}`" if val else "",
                comments.get(key, "").replace("|", "\\|"),
            ]
        )
    return rows


def _group_row(path: str, group: Tuple[List[str], str], comment: str) -> List[str]:
    options, default = group
    text = "config group: " + ", ".join(f"`{o}`" for o in options) + (f" ({comment})" if comment else "")
    return [f"`{path}`", "group", f"`{default}`", text.replace("|", "\\|")]


def _groups(name: str) -> Dict[str, Tuple[List[str], str]]:
    """group -> (options, default option) from the app's defaults list."""
    with open(os.path.join(conf_dir(), f"{name}.yaml"), encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    out = {}
    for entry in doc.get("defaults", []):
        if not isinstance(entry, dict):
            continue
        ((group, default),) = entry.items()
        gdir = os.path.join(conf_dir(), group)
        if group.startswith(("/", "override")) or not os.path.isdir(gdir):
            continue
        options = sorted(f[:-5] for f in os.listdir(gdir) if f.endswith(".yaml"))
        out[group] = (options, "null" if default is None else str(default))
    return out


def render() -> str:
    from ..config import register_configs

    register_configs()
    parts = [
        START,
        "",
        "Generated from `dtrain/config.py` and `conf/` by `make docs` "
        "(`tests/test_config_reference.py` fails when it is stale). `???` marks a key you must set.",
        "",
    ]
    for prog, name, what in APPS:
        cfg = _compose(name)
        parts += [
            f"<details><summary><code>{prog}</code>: {what} (<code>conf/{name}.yaml</code>)</summary>",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        parts += ["| " + " | ".join(r) + " |" for r in _rows(cfg, "", _groups(name))]
        parts += ["", "</details>", ""]
    parts.append(END)
    return "\n".join(parts)


def readme_path() -> str:
    return os.path.join(os.path.dirname(conf_dir()), "README.md")


def current_section(text: str) -> str:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0:
        return ""
    return text[i : j + len(END)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    new = render()
    if "--write" not in argv:
        print(new)
        return 0
    path = readme_path()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    old = current_section(text)
    if not old:
        print(f"{path} has no {START} ... {END} section", file=sys.stderr)
        return 2
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))
    print(f"{'updated' if old != new else 'unchanged'}: the configuration reference in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
