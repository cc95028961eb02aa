"""The README's configuration reference is generated from the structured configs: this
fails when it is stale (run `make docs`), and checks the generator sees every key."""

from __future__ import annotations

import dataclasses
import os

from conftest import REPO


def test_readme_config_reference_is_current():
    from dtrain.cli.config_reference import current_section, render

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert current_section(text), "README.md lost its config-reference markers"
    assert current_section(text) == render(), "README.md's configuration reference is stale: run `make docs`"


def test_reference_lists_every_key_with_its_type():
    from dtrain.cli.config_reference import render
    from dtrain.config import ExportConfig, SearchConfig, SimConfig, TrainConfig

    doc = render()
    for cls, prefix in ((SearchConfig, ""), (ExportConfig, ""), (SimConfig, "")):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                continue
            assert f"| `{prefix}{f.name}` |" in doc or f"| `{prefix}{f.name}." in doc, f.name
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}" in doc, f.name
    assert "| `outer.sync_every` | `int` | `50` |" in doc  # type from the dataclass, default from conf/
    assert "| `evolution.population` | `int` | `24` | candidates evaluated per generation |" in doc
