"""Tasks: the Task protocol; classification as language-model scoring (templates, verbalizers, loaders);
generation (instruction tuning: Dolly, Alpaca); registry."""

from meerkat_fl.tasks import glue as _glue  # noqa: F401  (registers the GLUE / SuperGLUE tasks)
from meerkat_fl.tasks import instruct as _instruct  # noqa: F401  (registers dolly, alpaca, instruct)
from meerkat_fl.tasks import text_classification as _text  # noqa: F401  (registers the others)
from meerkat_fl.tasks.base import (
    Batch,
    ClassificationData,
    EncodedData,
    answer_logits,
    classification_loss,
    classification_metrics,
    encode,
    label_logits,
    label_token_ids,
    predict,
)
from meerkat_fl.tasks.generation import (
    GenerationBatch,
    GenerationData,
    response_logits,
    response_loss,
    rouge_l,
)
from meerkat_fl.tasks.instruct import InstructionTask
from meerkat_fl.tasks.instruct_data import NO_CATEGORY, InstructionData
from meerkat_fl.tasks.loaders import Examples, load_file, read_examples
from meerkat_fl.tasks.protocol import EncodedSplit, Scorer, Split, TaskProtocol
from meerkat_fl.tasks.registry import get_task, list_tasks, register
from meerkat_fl.tasks.sources import FileSource, HubSource, SplitSource
from meerkat_fl.tasks.synthetic import SyntheticTask  # registers "synthetic" (generated, no files)
from meerkat_fl.tasks.synthetic_instruct import SyntheticInstructions  # registers "synthetic_instruct"
from meerkat_fl.tasks.task import HOLDOUT_SEED, HOLDOUT_TEST_FRACTION, PromptTemplate, Task, holdout_indices

__all__ = [
    "HOLDOUT_SEED",
    "HOLDOUT_TEST_FRACTION",
    "NO_CATEGORY",
    "Batch",
    "ClassificationData",
    "EncodedData",
    "EncodedSplit",
    "Examples",
    "FileSource",
    "GenerationBatch",
    "GenerationData",
    "HubSource",
    "InstructionData",
    "InstructionTask",
    "PromptTemplate",
    "Scorer",
    "Split",
    "SplitSource",
    "SyntheticInstructions",
    "SyntheticTask",
    "Task",
    "TaskProtocol",
    "answer_logits",
    "classification_loss",
    "classification_metrics",
    "encode",
    "get_task",
    "holdout_indices",
    "label_logits",
    "label_token_ids",
    "list_tasks",
    "load_file",
    "predict",
    "read_examples",
    "register",
    "response_logits",
    "response_loss",
    "rouge_l",
]
