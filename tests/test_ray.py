"""The Ray executor on a local Ray instance on the CPU: trials as Ray tasks, files back on the head."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.standin.helpers import (
    STANDIN, constant_step, git, lab_toml, make_dataset, make_lab, open_lab, set_constant,
)
from nightlab.agents.scripted import ScriptedProposer
from nightlab.night.scheduler import Researcher, Scheduler

ray = pytest.importorskip("ray", reason="the Ray executor needs Ray: pip install 'nightlab[cluster]'")


@pytest.fixture
def local_ray():
    yield {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
    ray.shutdown()


@pytest.mark.slow
def test_trials_run_as_ray_tasks_and_their_files_come_back(tmp_path, local_ray):
    from nightlab.night.executors import ray_workers

    data_dir = make_dataset(tmp_path / "data")
    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0),
                       set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
    lab = open_lab(lab_dir, data_dir)
    (lab_dir / "helper_data.txt").write_text("a lab file that only the job's runtime_env carries\n")
    workers = ray_workers("", 2, lab_dir, num_gpus=0, init_kwargs=local_ray)  # num_gpus=1 on a GPU cluster
    def sharper_reading_a_lab_file(worktree: Path) -> str:
        constant_step("sharper", "SHARPNESS", 1.0)(worktree)
        path = worktree / "train.py"
        text = path.read_text()  # read while training (the judge's model process gets the allowed files only)
        path.write_text(text.replace("def main():\n", 'def main():\n    assert open("helper_data.txt").read().startswith("a lab file")\n', 1))
        return "sharper"

    researcher = Researcher("a", ScriptedProposer([sharper_reading_a_lab_file,
                                                   constant_step("crashing", "MODE", "crash")]))
    Scheduler(lab, [researcher], workers).run(max_experiments=2)
    base, sharper, crashing = lab.experiments()
    assert (base.status, sharper.status, crashing.status) == ("keep", "keep", "crash")
    assert sharper.val_bpb < base.val_bpb and sharper.worker in ("ray0", "ray1")
    assert "RuntimeError: stand-in crash" in crashing.error
    run_dir = lab.runs_dir / str(sharper.id)
    assert {"train.log", "eval.json", "summary.json", "model.pt"} <= {p.name for p in run_dir.iterdir()}
    assert (lab_dir / ".nightlab" / "best" / "model.pt").exists()  # the best model is on the head
    assert git(lab_dir, "rev-parse", "nightlab/t") == sharper.commit_sha
