"""``docs/configuration.md``, generated from the config dataclasses in ``nightlab.config``.

Each setting's meaning is the comment on its line in ``config.py``, and nothing else: the file,
its test (tests/test_config_docs.py fails when the file is stale or a field has no comment) and
this generator all read that one place. ``python -m nightlab.config_docs`` prints the Markdown;
``python -m nightlab.config_docs docs/configuration.md`` writes it.
"""

from __future__ import annotations

import inspect
import io
import sys
import tokenize
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from nightlab import config as cfg

INTRO = """# Configuration

Every setting of a lab's `nightlab.toml`: its section and key, type, default and meaning. An
unknown key is an error that names it. Override any setting for one command with
`--set section.key=value` (TOML syntax, e.g. `--set run.max_experiments=20`).

This file is generated from the config dataclasses in `src/nightlab/config.py` (each meaning is the
comment on its field's line) by `python -m nightlab.config_docs docs/configuration.md`; do not
edit it by hand: `tests/test_config_docs.py` fails when it is out of date.
"""


def comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line in ``cls``'s source ("" where there is none)."""
    source = inspect.getsource(cls)
    notes: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            notes[token.start[0]] = token.string.lstrip("#").strip()
    found: dict[str, str] = {}
    for number, line in enumerate(source.splitlines(), start=1):
        name, colon, _ = line.strip().partition(":")
        if colon and name.isidentifier() and line.startswith("    ") and not line.startswith("     "):
            found.setdefault(name, notes.get(number, ""))
    return {f.name: found.get(f.name, "") for f in fields(cls)}


def type_name(hint: Any) -> str:
    """A field's type as a reader of TOML knows it."""
    if typing.get_origin(hint) is tuple:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(hint, getattr(hint, "__name__", str(hint)))


def render() -> str:
    """The whole Markdown file."""
    out = [INTRO]
    defaults = cfg.Config()
    for section in fields(cfg.Config):
        cls = type(getattr(defaults, section.name))
        hints, meaning = get_type_hints(cls), comments(cls)
        out.append(f"## [{section.name}]\n")
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(f"{cls.__name__}("):  # a dataclass's generated signature is no doc
            out.append(doc + "\n")
        out.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for f in fields(cls):
            default = cfg._toml_value(getattr(getattr(defaults, section.name), f.name))
            out.append(f"| `{f.name}` | {type_name(hints[f.name])} | `{default}` | {_cell(meaning[f.name])} |")
        out.append("")
    return "\n".join(out)


def undocumented() -> list[str]:
    """``section.key`` of every field with no comment on its line."""
    return [f"{section.name}.{name}" for section in fields(cfg.Config)
            for name, text in comments(type(getattr(cfg.Config(), section.name))).items() if not text]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if not args:
        sys.stdout.write(text)
        return 0
    Path(args[0]).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
