"""Prediction tasks (`--task`): classification, survival, regression, ordinal; see `base.Task`."""

from slidemil.tasks import classification, ordinal, regression, survival  # noqa: F401  (registers the tasks)
from slidemil.tasks.base import TASKS, Task, TaskConfig, create_task, model_task
from slidemil.tasks.evaluation import evaluate_run, render_report, sample_caveats, site_metrics, summary_line

__all__ = ["TASKS", "Task", "TaskConfig", "create_task", "model_task", "evaluate_run", "render_report",
           "sample_caveats", "site_metrics", "summary_line"]
