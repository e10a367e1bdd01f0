"""Role files: parsing, every error naming the file, the field and the fix; `nightlab org check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.cli import main
from nightlab.config import Config, load
from nightlab.agents import org
from nightlab.agents.org import OrgError, parse_role

TEMPLATE_ORG = Path(org.__file__).resolve().parents[1] / "template" / "org"


def _lab(tmp_path: Path, roles: dict[str, str], toml: str = "") -> Path:
    lab = tmp_path / "lab"
    (lab / "org").mkdir(parents=True)
    (lab / "program.md").write_text("Make val_bpb lower.\n")
    (lab / "nightlab.toml").write_text(toml)
    for name, text in roles.items():
        (lab / "org" / name).write_text(text)
    return lab


def test_default_roles_parse_into_researcher_reviewer_and_lead(tmp_path):
    lab = _lab(tmp_path, {p.name: p.read_text() for p in TEMPLATE_ORG.glob("*.md")})
    found = org.load(lab, load(lab))
    assert [r.name for r in found.researchers] == ["researcher"] and found.researchers[0].backend == "search"
    assert found.reviewer.backend == "rules" and found.lead.backend == "stats" and found.lead.every == 10
    assert not found.is_default
    assert "agenda item" in org.brief(found.researchers[0], "Make val_bpb lower.")
    assert org.brief(found.researchers[0], "Make val_bpb lower.").startswith("Make val_bpb lower.")


def test_program_md_alone_is_one_researcher_with_the_configured_agent(tmp_path):
    lab = _lab(tmp_path, {}, '[run]\nagent = "cli"\n')
    found = org.load(lab, load(lab))
    assert found.is_default and found.researchers[0].backend == "cli" and found.researchers[0].path is None


def test_counts_models_and_edits(tmp_path):
    lab = _lab(tmp_path, {"explorer.md": "---\nname: explorer\nkind: researcher\nbackend: api\nmodel: gpt-4.1\n"
                                         "count: 3\nedits: [train.py]\n---\nBe bold.\n"},
               '[lab]\nallowed_files = ["train.py", "prepare_notes.py"]\n')
    role = org.load(lab, load(lab)).researchers[0]
    assert role.instances() == ["explorer-1", "explorer-2", "explorer-3"] and role.edits == ("train.py",)
    assert org.role_config(role, load(lab)).api.model == "gpt-4.1" and role.instructions == "Be bold."


@pytest.mark.parametrize("text, message", [
    ("name: x\nkind: critic\n", "field 'kind' is 'critic'; write kind: researcher, reviewer or lead"),
    ("name: x\n", "field 'kind' is missing"),
    ("name: x\nkind: researcher\ncolour: red\n", "unknown field 'colour'; the fields are name, kind"),
    ("name: x\nkind: researcher\ncount: two\n", "field 'count' must be a whole number of at least 1, got 'two'"),
    ("name: x\nkind: researcher\nbackend: gpt\n", "field 'backend' is 'gpt'; a researcher can use search, api"),
    ("name: x\nkind: researcher\nbackend: api\n", "field 'model' is empty for the api backend; name the model"),
    ("name: x\nkind: researcher\nedits: [prepare.py]\n", "field 'edits' names prepare.py, not in lab.allowed_files"),
    ("name: x\nkind: lead\nevery: 0\n", "field 'every' must be at least 1 for a lead"),
    ("name: x\nkind: reviewer\ncount: 2\n", "field 'count' is 2, but an org has one reviewer"),
    ("name: x\nkind: reviewer\nevery: 5\n", "field 'every' is for a lead only"),
    ("name: two words\nkind: lead\n", "field 'name' 'two words' must be one word"),
    ("name: x\nkind: [researcher\n", "front matter is not valid YAML at line"),
])
def test_errors_name_the_file_the_field_and_the_fix(tmp_path, text, message):
    path = tmp_path / "role.md"
    path.write_text(f"---\n{text}---\nbody\n")
    with pytest.raises(OrgError) as raised:
        parse_role(path, Config(), "org/role.md")
    assert str(raised.value).startswith("org/role.md: ") and message in str(raised.value)


def test_front_matter_must_be_present_and_closed(tmp_path):
    path = tmp_path / "role.md"
    path.write_text("kind: researcher\n")
    with pytest.raises(OrgError, match="no front matter; start the file with a line '---'"):
        parse_role(path, Config())
    path.write_text("---\nkind: researcher\n")
    with pytest.raises(OrgError, match="never closed"):
        parse_role(path, Config())


def test_org_check_lists_every_problem_and_the_org(tmp_path, capsys):
    lab = _lab(tmp_path, {"a.md": "---\nkind: lead\n---\n", "b.md": "---\nname: a\nkind: reviewer\n---\n",
                          "c.md": "---\nkind: oracle\n---\n"})
    assert main(["org", "check", "--lab", str(lab)]) == 2
    out = capsys.readouterr().out
    assert "error: org/c.md: field 'kind' is 'oracle'" in out
    assert "error: org/b.md: field 'name' 'a' is also used by org/a.md" in out
    (lab / "org" / "b.md").unlink()
    (lab / "org" / "c.md").unlink()
    (lab / "org" / "r.md").write_text("---\nkind: researcher\ncount: 2\n---\n")
    assert main(["org", "check", "--lab", str(lab)]) == 0
    assert "org (org/*.md): 2 x r (search), lead a (stats, every 10)" in capsys.readouterr().out


def test_org_without_a_subcommand_prints_its_own_help(capsys):
    assert main(["org"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: nightlab org") and "check" in out and "simulate" not in out
