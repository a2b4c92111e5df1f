"""`copra tasks`: every embedded text task with its classes, split sizes and, on request, zero-shot accuracy.

Why zero-shot sits here: a task where the untrained encoder already scores well leaves little for an
adapter (or a merge of adapters) to show, so the table tells which tasks can tell LoRA from CopRA.
Zero-shot is the head-free classifier with fresh LoRA (B = 0: exactly the base encoder) on each
task's fixed evaluation subset; one classifier is built and only the class prompts change per task.
Loading 15 tasks takes seconds, evaluating them minutes on CPU, hence ``--zero-shot`` is opt-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from copra.utils.errors import UserError


def task_rows(
    names: Sequence[str],
    zero_shot: bool = False,
    eval_examples: int | None = 500,
    model: str = "embedded:minilm",
    progress: bool = True,
    max_length: int = 64,
) -> list[dict[str, Any]]:
    """One row per task: name, classes, train, test, template, zero_shot (None if not asked), error."""
    from copra.data.text_tasks import load_task

    rows = []
    for name in names:
        try:
            task = load_task(name)
        except UserError as error:  # a missing data wheel: say so on the task's row, list the others
            rows.append(dict(name=name, error=str(error)))
            continue
        rows.append(
            dict(
                name=name,
                classes=task.num_classes,
                train=len(task.train_texts),
                test=len(task.test_texts),
                template=task.template,
                zero_shot=None,
                error=None,
            )
        )
    if zero_shot:
        from copra.models.base_model import model_settings

        settings = dict(model=model, eval_examples=eval_examples, max_length=max_length, **model_settings(model))
        _add_zero_shot([r for r in rows if not r["error"]], settings, progress)
    return rows


def _add_zero_shot(rows: list[dict[str, Any]], settings: dict[str, Any], progress: bool) -> None:
    from copra.core.config import make_config
    from copra.models import build_classifier
    from copra.models.evaluation import accuracy, prepare_data
    from copra.training.loop import seed_everything

    if not rows:
        return
    base = make_config(dict(settings, task=rows[0]["name"], shots=1, progress=False))
    seed_everything(base.seed)
    classifier = build_classifier(base)  # fresh LoRA, B = 0: the base encoder
    for row in tqdm(rows, desc="zero-shot", leave=False, disable=not progress):
        data = prepare_data(base.replace(task=row["name"]))
        classifier.set_prompts(list(data.prompts))
        row["zero_shot"] = accuracy(classifier, data.eval_x, data.eval_y)
        row["evaluated"] = len(data.eval_y)


def render(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (zero-shot column only when it was computed)."""
    scored = any(r.get("zero_shot") is not None for r in rows)
    head = "| task | classes | train | test |" + (" zero-shot % (n) |" if scored else "") + " class prompt |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['name']} | unavailable: {r['error']} |")
            continue
        zero = f" {100 * r['zero_shot']:.1f} ({r['evaluated']}) |" if scored else ""
        lines.append(f"| {r['name']} | {r['classes']} | {r['train']} | {r['test']} |{zero} `{r['template']}` |")
    return "\n".join(lines)
