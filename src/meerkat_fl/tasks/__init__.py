"""Classification tasks as language-model scoring: templates, verbalizers, loaders, registry, scorer."""

from meerkat_fl.tasks import glue as _glue  # noqa: F401  (registers the GLUE / SuperGLUE tasks)
from meerkat_fl.tasks import text_classification as _text  # noqa: F401  (registers the others)
from meerkat_fl.tasks.base import (
    Batch,
    ClassificationData,
    EncodedData,
    LabelScorer,
    encode,
    label_token_ids,
)
from meerkat_fl.tasks.loaders import Examples, load_file, read_examples
from meerkat_fl.tasks.registry import get_task, list_tasks, register
from meerkat_fl.tasks.sources import FileSource, HubSource, SplitSource
from meerkat_fl.tasks.task import HOLDOUT_SEED, HOLDOUT_TEST_FRACTION, PromptTemplate, Task, holdout_indices

__all__ = [
    "HOLDOUT_SEED",
    "HOLDOUT_TEST_FRACTION",
    "Batch",
    "ClassificationData",
    "EncodedData",
    "Examples",
    "FileSource",
    "HubSource",
    "LabelScorer",
    "PromptTemplate",
    "SplitSource",
    "Task",
    "encode",
    "get_task",
    "holdout_indices",
    "label_token_ids",
    "list_tasks",
    "load_file",
    "read_examples",
    "register",
]
