"""docs/configuration.md is generated from the config dataclasses and cannot drift from them."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from nightlab import config as cfg
from nightlab import config_docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_configuration_doc_is_up_to_date():
    assert DOC.read_text() == config_docs.render(), (
        "docs/configuration.md is stale: run `python -m nightlab.config_docs docs/configuration.md`")


def test_every_setting_is_in_the_doc_with_its_meaning():
    assert config_docs.undocumented() == [], "give each config field a comment on its line: it is its documentation"
    text = config_docs.render()
    for section in fields(cfg.Config):
        assert f"## [{section.name}]" in text
        for f in fields(type(getattr(cfg.Config(), section.name))):
            assert f"| `{f.name}` |" in text, f"{section.name}.{f.name}"
    assert "| `preset` | string | `\"claude\"` | claude \\| codex \\| aider \\| gemini \\| opencode" in text
    assert "| `max_cost_usd` | number | `0.0` |" in text


def test_a_field_comment_is_its_meaning():
    meaning = config_docs.comments(cfg.RunConfig)
    assert meaning["max_repeats"].startswith("proposals refused as repeats in a row")
    assert config_docs.type_name(tuple[str, ...]) == "list of string"


def test_the_nightlab_toml_that_init_writes_points_to_the_doc(tmp_path):
    from nightlab.cli import main

    assert main(["init", str(tmp_path / "lab"), "--device", "cpu"]) == 0
    head = (tmp_path / "lab" / "nightlab.toml").read_text().split("[lab]")[0]
    assert "docs/configuration.md" in head and "python -m nightlab.config_docs" in head
