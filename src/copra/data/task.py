"""What every classification task offers the classifier: class names that go into prompts.

Text tasks (`text_tasks.TextTask`) and image tasks (`coop.ImageTask`) share these checks and the
prompt filling, so a task of either kind fails the same way on the same mistake.
"""

from __future__ import annotations

from collections.abc import Sequence

from copra.utils.errors import UserError


class PromptTask:
    """Mixin for a frozen dataclass with `name`, `class_names`, `template` and `source` fields."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prompts(self) -> list[str]:
        """The template filled with every class name, in label order."""
        return [self.template.format(c) for c in self.class_names]

    def check(self, kind: str, splits: dict[str, tuple[Sequence, Sequence[int]]]) -> None:
        """One clear UserError for a bad template, too few classes, or a broken split of `kind`s."""
        if self.template.count("{}") != 1:
            raise UserError(f"task {self.name!r}: template {self.template!r} needs exactly one '{{}}'")
        if len(self.class_names) < 2:
            raise UserError(f"task {self.name!r}: needs at least 2 classes, got {self.class_names!r}")
        for split, (examples, labels) in splits.items():
            if not examples:
                raise UserError(f"task {self.name!r}: the {split} split is empty ({self.source})")
            if len(examples) != len(labels):
                raise UserError(f"task {self.name!r}: {len(examples)} {split} {kind} but {len(labels)} labels")
            bad = [y for y in labels if not 0 <= y < len(self.class_names)]
            if bad:
                raise UserError(f"task {self.name!r}: {split} label {bad[0]} outside 0..{len(self.class_names) - 1}")
