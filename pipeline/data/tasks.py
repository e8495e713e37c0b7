"""Zero-shot tasks: what a dataset asks of an aligned model, and the prompts that pose it.

A task is *classification* (one split, a label column, class names and prompt templates),
*retrieval* (image-text retrieval over the captions of one split) or *segmentation* (one
split, a column of mask files, class names and prompt templates).

Class-index convention, followed by every adapter: ``label_column`` names an int column
of the split's ``images.parquet`` that holds the 0-based index into ``classnames``, or
``NOT_IN_TASK`` (-1) where the image is not part of the task (``novel_combination`` covers
only the test images of held-out combinations). Evaluators keep the rows with a label >= 0.

Segmentation convention: ``label_column`` names a string column of mask file paths (null
where the image has no mask: it is then not part of the task); a mask pixel holds the class
index, class 0 is the background, and ``IGNORE_INDEX`` (255) marks pixels that count nowhere
(VOC's object borders). Its classes get prompts like a classification task's.

Every template holds exactly one ``{}``, replaced by the class name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
SEGMENTATION = "segmentation"
KINDS = (CLASSIFICATION, RETRIEVAL, SEGMENTATION)
PROMPTED = (CLASSIFICATION, SEGMENTATION)  # kinds whose classes are posed by prompts
NOT_IN_TASK = -1
IGNORE_INDEX = 255  # mask pixels that count nowhere
BACKGROUND = 0  # the background class of a segmentation task

PROMPT_SCHEMA = {
    "prompt_id": pl.String,
    "task": pl.String,
    "class_index": pl.Int64,
    "class_name": pl.String,
    "template_index": pl.Int64,
    "text": pl.String,
}

# The seven templates CLIP's authors found best for ImageNet (a small CLIP-style default).
CLIP_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Templates of the synthetic world's tasks, written to read well with the class names
# that ``pipeline.data.synthetic.world_tasks`` pairs them with.
SYNTHETIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": (
        "a picture of a {}.",
        "a drawing of a {} shape.",
        "an image with a {} in it.",
        "a simple {} on a grey background.",
        "a rendering of a {}.",
    ),
    "colour": (
        "a picture of {} shapes.",
        "shapes coloured {}.",
        "an image of {} objects.",
        "a drawing in {}.",
        "{} things on a grey background.",
    ),
    "size": (
        "a picture of {} shapes.",
        "an image of a {} object.",
        "a drawing with {} objects.",
        "{} things on a grey background.",
        "a rendering of {} shapes.",
    ),
    "position": (
        "a picture with shapes {}.",
        "an image with objects {}.",
        "shapes drawn {}.",
        "a drawing with everything {}.",
        "objects placed {} of the image.",
    ),
    "count": (
        "a picture of {}.",
        "an image showing {}.",
        "a drawing of {}.",
        "{} on a grey background.",
        "a rendering of {}.",
    ),
    "novel_combination": (
        "a picture showing the {}.",
        "a drawing of a single {}.",
        "the {} on a grey background.",
        "an image with one {}.",
        "a rendering of the {}.",
    ),
    "segmentation": (
        "a picture of a {}.",
        "a drawing of a {}.",
        "an image with a {} in it.",
        "a rendering of a {}.",
        "a photo of a {}.",
    ),
}


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` holds exactly one ``{}``."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}'")


def fill_template(template: str, class_name: str) -> str:
    return template.replace("{}", class_name)


@dataclass(frozen=True)
class Task:
    """One zero-shot task of a dataset (see the module docstring for the label convention)."""

    name: str
    kind: str
    split: str
    label_column: str | None = None
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    background: int | None = BACKGROUND  # segmentation: the class miou_fg leaves out (None: none)

    def __post_init__(self) -> None:
        if self.kind == RETRIEVAL:
            if self.label_column is not None or self.classnames or self.templates:
                raise ValueError(f"retrieval task {self.name!r} takes no labels or prompts")
        elif self.kind in PROMPTED:
            if not self.label_column:
                raise ValueError(f"{self.kind} task {self.name!r} has no label_column")
            if len(set(self.classnames)) < 2:  # a name may repeat: CLIP's ImageNet list does
                raise ValueError(
                    f"{self.kind} task {self.name!r} needs at least 2 distinct classnames"
                )
            if self.kind == SEGMENTATION and len(self.classnames) > IGNORE_INDEX:
                raise ValueError(
                    f"segmentation task {self.name!r}: masks hold at most {IGNORE_INDEX} classes"
                )
            background = self.background
            if self.kind == SEGMENTATION and background not in (None, *range(len(self.classnames))):
                raise ValueError(
                    f"segmentation task {self.name!r}: background {background!r} is not "
                    f"one of its {len(self.classnames)} class indices"
                )
            if not self.templates:
                raise ValueError(f"{self.kind} task {self.name!r} has no templates")
            for template in self.templates:
                try:
                    check_template(template)
                except ValueError as err:
                    raise ValueError(f"{self.kind} task {self.name!r}: {err}") from None
        else:
            raise ValueError(f"task {self.name!r} has kind {self.kind!r}; expected one of {KINDS}")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == RETRIEVAL:
            return {"name": self.name, "kind": self.kind, "split": self.split}
        return {
            "name": self.name,
            "kind": self.kind,
            "split": self.split,
            "label_column": self.label_column,
            "classnames": list(self.classnames),
            "templates": list(self.templates),
            **({"background": self.background} if self.kind == SEGMENTATION else {}),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Task:
        missing = {"name", "kind", "split"} - set(record)
        if missing:
            raise ValueError(f"task record {dict(record)!r} lacks {sorted(missing)}")
        return cls(
            name=record["name"],
            kind=record["kind"],
            split=record["split"],
            label_column=record.get("label_column"),
            classnames=tuple(record.get("classnames", ())),
            templates=tuple(record.get("templates", ())),
            background=record.get("background", BACKGROUND),
        )


def prompts_frame(tasks: Iterable[Task]) -> pl.DataFrame:
    """Every prompt of every classification and segmentation task, one row per (task, class,
    template)."""
    rows = [
        {
            "prompt_id": f"{task.name}-c{c:04d}-t{t:03d}",
            "task": task.name,
            "class_index": c,
            "class_name": name,
            "template_index": t,
            "text": fill_template(template, name),
        }
        for task in tasks
        if task.kind in PROMPTED
        for c, name in enumerate(task.classnames)
        for t, template in enumerate(task.templates)
    ]
    return pl.DataFrame(rows, schema=PROMPT_SCHEMA)
