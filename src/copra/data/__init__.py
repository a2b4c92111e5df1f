"""Offline text-classification data: tasks read from installed wheels, and few-shot/eval subsets.

Kept import-light on purpose (standard library only), so ``copra.data`` can be used by the CLI and
tests without loading torch or the data packages themselves.
"""

from copra.data.fewshot import eval_indices, few_shot_indices, validation_indices
from copra.data.text_tasks import TASKS, TextTask, load_task, task_names

__all__ = ["TASKS", "TextTask", "eval_indices", "few_shot_indices", "load_task", "task_names",
           "validation_indices"]
