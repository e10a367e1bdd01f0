"""The charts from a fixture store: what they draw, and that an empty night still draws."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from nightlab.report import data, plots
from nightlab.night import git
from nightlab.night.store import Store
from test_report import SimulatedNight, simulated_night


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> SimulatedNight:
    return simulated_night(tmp_path_factory.mktemp("plots"), workers=3)


def _pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")[..., :3]


def _count(pixels: np.ndarray, color: str, tolerance: float = 0.06) -> int:
    rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=-1) < tolerance).sum())


def test_progress_chart_draws_staircase_keeps_discards_and_failures(night: SimulatedNight) -> None:
    n = data.load_night(night.lab)
    pixels = _pixels(plots.progress_png(n))
    assert pixels.shape == (6 * plots.DPI, 12 * plots.DPI, 3)
    for status in ("keep", "discard", "crash", "timeout", "invalid", "best"):
        assert _count(pixels, plots.COLORS[status]) > 20, status


def test_progress_chart_without_failures_has_no_failure_marks(tmp_path: Path) -> None:
    quiet = simulated_night(tmp_path, plan=["keep", "discard", "keep"], workers=1, running=False)
    pixels = _pixels(plots.progress_png(data.load_night(quiet.lab)))
    for status in ("crash", "timeout", "invalid"):
        assert _count(pixels, plots.COLORS[status]) == 0, status
    assert _count(pixels, plots.COLORS["best"]) > 20


def test_timeline_has_one_lane_per_worker_with_training_and_evaluation(night: SimulatedNight) -> None:
    n = data.load_night(night.lab)
    pixels = _pixels(plots.timeline_png(n))
    assert pixels.shape[0] == int((1.2 + 0.6 * 3) * plots.DPI)
    train, evaluate = _count(pixels, plots.COLORS["train"]), _count(pixels, plots.COLORS["eval"])
    assert train > 5 * evaluate > 0
    # Three lanes: rows of the image crossing training bars form three separate bands.
    rows = np.flatnonzero((np.abs(pixels - np.array([0x19, 0x76, 0xD2]) / 255).max(axis=-1) < 0.06).sum(axis=1) > 50)
    assert 1 + int((np.diff(rows) > 1).sum()) == 3


def test_a_night_with_nothing_measured_still_draws(tmp_path: Path) -> None:
    from fixtures.standin.helpers import make_lab
    from nightlab.config import Config, dumps

    lab = make_lab(tmp_path / "lab")
    with Store.open(lab) as store:
        store.add_run("t", "nightlab/t", git.resolve(lab, "HEAD"), "search", dumps(Config()))
    n = data.load_night(lab)
    for png in (plots.progress_png(n), plots.timeline_png(n)):
        assert png.startswith(b"\x89PNG") and _pixels(png).std() > 0  # a placeholder message, not an error
