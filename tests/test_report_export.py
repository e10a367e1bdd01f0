"""Export: results.tsv in autoresearch's columns, and runs into MLflow's local store (when MLflow is installed)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from nightlab.cli import main
from nightlab.report import data, export
from test_report import PLAN, SimulatedNight, simulated_night


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> SimulatedNight:
    return simulated_night(tmp_path_factory.mktemp("export"))


def test_results_tsv_reads_like_autoresearch(night: SimulatedNight, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "tsv", "--lab", str(night.lab)]) == 0
    path = night.lab / ".nightlab" / "results.tsv"
    assert capsys.readouterr().out == f"results: {path}\n"
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    n = data.load_night(night.lab)
    finished = n.finished
    assert list(rows[0]) == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert len(rows) == len(finished) == 1 + len(PLAN)
    for row, r in zip(rows, finished):
        if r.status == "agent_failed":  # autoresearch's word for it, with the reason in the description
            assert row["status"] == "crash" and " ".join(r.exp.reason.split()) in row["description"]
        else:
            assert row["status"] == r.status
        assert row["commit"] == (r.exp.commit_sha or "")[:7]
        assert float(row["val_bpb"]) == pytest.approx(r.exp.val_bpb or 0.0, abs=1e-6)


def test_results_tsv_into_a_folder_or_nowhere(night: SimulatedNight, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["export", "tsv", "--lab", str(night.lab), "--out", f"{folder}/"]) == 0
    assert capsys.readouterr().out == f"results: {folder / 'results.tsv'}\n"
    assert [p.name for p in folder.iterdir()] == ["results.tsv"]
    assert main(["export", "tsv", "--lab", str(night.lab), "--out", str(tmp_path / "missing" / "r.tsv")]) == 2
    assert capsys.readouterr().err == (f"nightlab: error: cannot write {tmp_path / 'missing' / 'r.tsv'}: "
                                       "No such file or directory\n")


def test_mlflow_export_logs_each_finished_experiment_once(night: SimulatedNight, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = export.export_mlflow(night.lab)
    assert first.tracking_uri == f"sqlite:///{(night.lab / '.nightlab' / 'mlflow.db').resolve()}"
    n = data.load_night(night.lab)
    assert (first.added, first.already) == (len(n.finished), 0)
    again = export.export_mlflow(night.lab)
    assert (again.added, again.already) == (0, len(n.finished))

    client = MlflowClient(tracking_uri=first.tracking_uri)
    runs = {int(r.data.tags["nightlab.exp_id"]): r for r in client.search_runs([first.experiment_id], max_results=500)}
    assert set(runs) == {r.id for r in n.finished}
    best = runs[n.best.id]
    assert best.data.metrics["val_bpb"] == pytest.approx(night.best_val)
    assert best.data.metrics["delta_vs_parent"] == pytest.approx(n.best.delta)
    assert best.data.metrics["epochs"] == pytest.approx(n.best.exp.epochs)
    assert best.data.tags["nightlab.commit"] == n.best.exp.commit_sha and best.info.status == "FINISHED"
    assert best.data.params["worker"] == n.best.exp.worker
    diff = client.download_artifacts(best.info.run_id, "diff.patch", str(tmp_path))
    assert Path(diff).read_text() == n.diff(n.best)
    crash = next(r for r in n.finished if r.status == "crash")
    assert runs[crash.id].info.status == "FAILED"
    trials = client.get_metric_history(best.info.run_id, "val_bpb_trial")
    assert sorted((m.step, m.value) for m in trials) == list(enumerate(n.best.values))


def test_mlflow_missing_is_a_clean_message(night: SimulatedNight, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    assert main(["export", "mlflow", "--lab", str(night.lab)]) == 2
    assert "mlflow is not installed here; `pip install mlflow`" in capsys.readouterr().err
