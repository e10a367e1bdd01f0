"""Export a night to what people already use: autoresearch's ``results.tsv``, and MLflow.

``results.tsv`` is written by the store itself (``Store.export_tsv``), so the loop and this command
write the same file. MLflow gets one MLflow run per finished experiment, in the lab's own local
store (``LAB/.nightlab/mlflow.db``) unless a tracking URI is given; exporting again adds only the
experiments not yet there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from nightlab.paths import state_dir
from nightlab.report.data import Night, Row, load_night
from nightlab.night.store import Store

RESULTS_FILE = "results.tsv"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
METRICS = ("val_bpb", "training_seconds", "total_seconds", "total_tokens", "epochs", "num_steps", "num_params",
           "peak_memory_mb", "mfu_percent", "cost_usd", "tokens_in", "tokens_out", "noise", "holdout_bpb")
PARAMS = ("kind", "worker", "agent", "seed", "files_changed", "lines_added", "lines_removed", "code_lines",
          "budget", "disturbed")
TAG = "nightlab"  # prefix of the tags nightlab sets on MLflow runs


class MissingMlflow(ImportError):
    """MLflow is not installed; the message says how to install it."""


@dataclass(frozen=True)
class MlflowExport:
    tracking_uri: str
    experiment_id: str
    experiment_name: str
    added: int
    already: int


def export_tsv(lab_dir: Path | str, out: Path | str | None = None, run_tag: str | None = None) -> Path:
    """``results.tsv`` of the run ``run_tag`` (default: the latest) at ``out`` (default: ``LAB/.nightlab/``)."""
    with Store.open(lab_dir) as store:
        night = load_night(lab_dir, run_tag, store=store)
        return store.export_tsv(Path(out) if out else state_dir(lab_dir) / RESULTS_FILE, night.run.tag)


def default_tracking_uri(lab_dir: Path | str) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else a SQLite store inside the lab."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(state_dir(lab_dir) / MLFLOW_DB).resolve()}"


def export_mlflow(lab_dir: Path | str, tracking_uri: str | None = None, experiment_name: str | None = None,
                  run_tag: str | None = None) -> MlflowExport:
    """Log each finished experiment of the run as an MLflow run (params, metrics, tags, its diff); an
    agent's failure is a FAILED run with its reason in the note."""
    try:
        from mlflow.tracking import MlflowClient  # deferred: optional SDK (nightlab[mlflow])
    except ImportError:
        raise MissingMlflow("mlflow is not installed here; `pip install mlflow` (or mlflow-skinny), then export "
                            "again") from None
    lab_dir = Path(lab_dir)
    night = load_night(lab_dir, run_tag)
    uri = tracking_uri or default_tracking_uri(lab_dir)
    name = experiment_name or f"nightlab {lab_dir.resolve().name}"
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        artifacts = (state_dir(lab_dir) / MLFLOW_ARTIFACTS).resolve().as_uri() if uri.startswith("sqlite:") else None
        experiment_id = client.create_experiment(name, artifact_location=artifacts)
    done = _exported_ids(client, experiment_id, night.run.tag)
    added = 0
    for row in night.finished:
        if row.id in done or row.status == "repeat":  # a refused repeat never trained: no run to log
            continue
        _log_row(client, experiment_id, night, row)
        added += 1
    return MlflowExport(uri, experiment_id, name, added, len(done))


def _exported_ids(client, experiment_id: str, run_tag: str) -> set[int]:
    ids: set[int] = set()
    token = None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{TAG}.run_tag` = '{_quote(run_tag)}'",
                                  max_results=1000, page_token=token)
        ids.update(int(r.data.tags[f"{TAG}.exp_id"]) for r in page if f"{TAG}.exp_id" in r.data.tags)
        token = page.token
        if not token:
            return ids


def _log_row(client, experiment_id: str, night: Night, row: Row) -> None:
    from mlflow.entities import Metric, Param, RunTag  # deferred: optional SDK (nightlab[mlflow])

    e = row.exp
    start, end = _millis(e.started_at or e.created_at), _millis(e.finished_at)
    tags = {f"{TAG}.exp_id": str(e.id), f"{TAG}.run_tag": night.run.tag, f"{TAG}.status": e.status,
            f"{TAG}.branch": night.run.branch, "mlflow.note.content": _note(row)}
    if e.commit_sha:
        tags.update({f"{TAG}.commit": e.commit_sha, "mlflow.source.git.commit": e.commit_sha})
    if e.parent_commit:
        tags[f"{TAG}.parent"] = e.parent_commit
    run = client.create_run(experiment_id, start_time=start, run_name=f"#{e.id} {_short(e.description, 80)}",
                            tags=tags)
    stamp = end or start or 0
    metrics = [Metric(name, float(getattr(e, name)), stamp, 0) for name in METRICS if getattr(e, name) is not None]
    if row.delta is not None:
        metrics.append(Metric("delta_vs_parent", row.delta, stamp, 0))
    metrics += [Metric("val_bpb_trial", value, stamp, k) for k, value in enumerate(row.values)]
    params = [Param(name, str(getattr(e, name))) for name in PARAMS if getattr(e, name) is not None]
    client.log_batch(run.info.run_id, metrics=metrics, params=params,
                     tags=[RunTag("description", _short(e.description, 500))])
    diff = night.diff(row)
    if diff:
        client.log_text(run.info.run_id, diff, "diff.patch")
    if e.error:
        client.log_text(run.info.run_id, e.error, "error.txt")
    client.set_terminated(run.info.run_id, "FINISHED" if e.status in ("keep", "discard") else "FAILED", end_time=end)


def _note(row: Row) -> str:
    e = row.exp
    lines = [e.description, ""]
    if e.rationale:
        lines += [f"Rationale: {e.rationale}", ""]
    if e.reason:
        lines.append(f"Verdict: {e.status}: {e.reason}")
    return "\n".join(lines).strip()


def _millis(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        return None


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
