"""The training engine: configs, the loop, run directories, resume, divergence, probes, results.

Where things live:
- ``config.py``   ``TrainConfig`` (flat frozen dataclass), ``apply_overrides``, ``config_hash``
- ``schedule.py`` learning rate per step, probe steps (log-spaced / every N)
- ``task.py``     config -> in-memory tensors (``Task``), model, loss
- ``probes.py``   ``Probe``, ``ProbeContext``: measurements attached on a schedule, guarded
- ``rundir.py``   run directory layout, atomic writes, the lock, metrics.jsonl, checkpoints
- ``loop.py``     ``train_run``: one run to its end (resume, divergence, evaluation, probes)
- ``runner.py``   ``run_experiment``: variants x seeds, cost estimate, workers, progress, summary
- ``results.py``  ``load_results``: stored runs for verdicts, plots and the report (never trains)
- ``cost.py``     per-step cost table behind the estimate
- ``env.py``      what env.json records
- ``tensorboard.py`` optional TensorBoard logging
"""

from bnlab.train.config import TrainConfig, apply_overrides, config_from_dict, config_hash, config_to_dict
from bnlab.train.loop import RunOptions, RunOutcome, RunSpec, train_run
from bnlab.train.probes import Probe, ProbeContext
from bnlab.train.results import ExperimentResults, RunResult, load_results, load_run
from bnlab.train.runner import ExperimentRun, plan_runs, run_experiment
from bnlab.train.schedule import lr_at, probe_steps
from bnlab.train.task import Task, build_task

__all__ = [
    "ExperimentResults", "ExperimentRun", "Probe", "ProbeContext", "RunOptions", "RunOutcome", "RunResult",
    "RunSpec", "Task", "TrainConfig", "apply_overrides", "build_task", "config_from_dict", "config_hash",
    "config_to_dict", "load_results", "load_run", "lr_at", "plan_runs", "probe_steps", "run_experiment",
    "train_run",
]
