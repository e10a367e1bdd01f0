"""The one typed config: nightlab.toml and --set, checked against the dataclass fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab import config as cfg


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    changed = cfg.Config().with_overrides(["lab.budget_s=120", 'run.agent="api"', 'lab.allowed_files=["train.py", "optim.py"]'])
    (tmp_path / cfg.CONFIG_FILE).write_text(cfg.dumps(changed))
    assert cfg.load(tmp_path) == changed


def test_set_parses_toml_values_and_plain_strings() -> None:
    conf = cfg.Config().with_overrides(["lab.budget_s=90", "lab.dataset=local:/data/books", "run.hours=7.5"])
    assert conf.lab.budget_s == 90.0 and conf.lab.dataset == "local:/data/books" and conf.run.hours == 7.5


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("lab.budget=60", "unknown key lab.budget"),
        ("labs.budget_s=60", "unknown section [labs]"),
        ("budget_s=60", "section.field=value"),
        ("lab.budget_s=soon", "lab: budget_s = 'soon' is not a valid float"),
        ("lab.budget_s=0", "lab.budget_s must be positive"),
        ("run.policy=lucky", "run.policy must be noise or greedy"),
    ],
)
def test_a_bad_setting_is_an_error_that_names_it(assignment: str, named: str) -> None:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.Config().with_overrides([assignment])
    assert named in str(e.value)


def test_a_bad_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    (tmp_path / cfg.CONFIG_FILE).write_text("[lab]\nbudget_s = 60\nwarp = 9\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(tmp_path)
    assert str(tmp_path / cfg.CONFIG_FILE) in str(e.value) and "lab.warp" in str(e.value)
    (tmp_path / cfg.CONFIG_FILE).write_text("[lab\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(tmp_path)
    assert "not valid TOML" in str(e.value)
