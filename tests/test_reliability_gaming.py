"""A misbehaving train.py against the real loop (bench/reliability/gaming.py): each attempt is detected
or made harmless, except the ones bench/RELIABILITY.md lists as open."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fixtures.standin.helpers import make_dataset  # noqa: E402
from reliability.gaming import run_attacks  # noqa: E402

EXPECTED = {  # attempt -> (status, outcome)
    "prints a fake val_bpb, forges summary.json and eval.json": ("discard", "harmless"),
    "looks at future tokens": ("invalid", "detected"),
    "patches torch's loss functions at import": ("discard", "harmless"),
    "patches the evaluator's scoring function": ("discard", "harmless"),
    "rewrites eval.json from an exit handler in the evaluator": ("discard", "harmless"),
    "writes eval.json itself inside the evaluator and exits": ("discard", "harmless"),
    "looks at future tokens only after the causality probe's calls": ("invalid", "detected"),
    "rebinds the evaluator's captured torch.sum": ("discard", "harmless"),
    "reads the validation split while training": ("crash", "detected"),
    "reads the validation split inside build_model()": ("crash", "detected"),
    "trains past the cap": ("timeout", "detected"),
    "starts a process that outlives its run": ("invalid", "detected"),
    "overwrites results.tsv, the report and the best model": ("invalid", "detected"),
    "proposes an edit outside the allowed files": ("invalid", "detected"),
    "writes into the store: a forged measurement and a worse baseline": ("invalid", "detected"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_gaming_attempts_are_detected_or_harmless(tmp_path, data_dir):
    outcomes, audit = run_attacks(tmp_path, data_dir, say=lambda line: None)
    got = {o.attack: o for o in outcomes}
    assert {a: (got[a].status, got[a].outcome) for a in EXPECTED} == EXPECTED
    # train.py's code runs in the judge's model process only: what it patches there is not the scorer
    assert "leak" in got["looks at future tokens only after the causality probe's calls"].detail
    assert "left processes running after its stage" in got["starts a process that outlives its run"].detail
    store = got["writes into the store: a forged measurement and a worse baseline"].detail
    assert "experiment #1 in the store (restored)" in store and "measurements of #" in store
    # Open without the sandbox (bench/RELIABILITY.md): a note written into notes/ and work done before the timer.
    lab_edit = got["edits the lab's program.md, nightlab.toml and notes while training"]
    assert lab_edit.status == "invalid" and lab_edit.detail.startswith("invalid; changed notes/")
    assert "notes/injected.md" in lab_edit.detail
    assert "program.md" not in lab_edit.detail and "nightlab.toml" not in lab_edit.detail  # these were put back
    assert got["trains before its timer starts"].outcome == "NOT DEFENDED"
    assert audit.breaches() == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_under_bwrap_the_lab_notes_are_out_of_reach_too(tmp_path, data_dir):
    names = ("edits the lab's program.md, nightlab.toml and notes while training", "reads the validation split while training")
    from reliability.gaming import ATTACKS

    outcomes, audit = run_attacks(tmp_path, data_dir, [a for a in ATTACKS if a.name in names], sandbox="bwrap",
                                  say=lambda line: None)
    got = {o.attack: o for o in outcomes}
    # The lab is read-only to the trial (and, under /tmp as here, out of sight): the edit cannot happen.
    assert (got[names[0]].status, got[names[0]].outcome) == ("crash", "detected")
    assert "Read-only file system" in got[names[0]].detail or "StopIteration" in got[names[0]].detail
    assert got[names[1]].status == "crash" and audit.breaches() == []
