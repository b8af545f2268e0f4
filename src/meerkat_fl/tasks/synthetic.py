"""A built-in synthetic classification task generated in memory: no files, no network, no `datasets`.

`task.name = "synthetic"` gives a smoke test anywhere (the test suite and configs/tiny.toml use it). Each
sentence mixes neutral filler words with two words of its class's sentiment (and, one time in four, a
word of the other sentiment), so the label is learnable but not trivially so. Rows are a pure function of
the task's seed and the split: `task.train_size` / `task.eval_size` subsample them like any task's.
Register other sizes or seeds as new tasks, e.g.
`register(SyntheticTask(**SYNTHETIC_FIELDS, name="synthetic-big", sizes=(("train", 20000), ("test", 2000))))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meerkat_fl.errors import ConfigError
from meerkat_fl.tasks.base import ClassificationData
from meerkat_fl.tasks.registry import register
from meerkat_fl.tasks.sources import SplitSource
from meerkat_fl.tasks.task import PromptTemplate, Task

FILLER = ("the", "movie", "plot", "was", "and", "a", "story", "with", "cast", "scenes", "of", "it",
          "film", "music", "ending", "quite", "this", "its", "very", "at", "times")
SENTIMENT = (
    ("bad", "dull", "awful", "boring", "weak", "messy", "poor", "tedious"),  # label 0
    ("good", "great", "fun", "lovely", "superb", "charming", "smart", "moving"),  # label 1
)


@dataclass(frozen=True)
class SyntheticTask(Task):
    """A two-class sentiment-like task whose rows are generated from `seed`; `sizes` = rows per split."""

    seed: int = 0
    sizes: tuple[tuple[str, int], ...] = (("train", 2000), ("test", 500))

    def load(
        self, split: str, *, path: str | Path | None = None, data_dir: str | Path | None = None,
        hub: str | None = None,
    ) -> ClassificationData:
        """Generated rows of `split`; a file `path` or a dataset `hub` is read like any task's (data_dir is
        unused: nothing is looked up in a data folder)."""
        if path is not None or hub is not None:
            return super().load(split, path=path, hub=hub)
        rng, size = split_stream(self.name, self.sizes, self.seed, split)
        labels = rng.permutation(np.arange(size) % len(SENTIMENT))
        prompts = [self.template({"sentence": sentence(rng, int(label))}) for label in labels]
        return ClassificationData(prompts, labels, f"synthetic:{self.name}:{split}")


def split_stream(name: str, sizes: tuple[tuple[str, int], ...], seed: int, split: str) -> tuple[np.random.Generator, int]:
    """(generator, rows) of a generated split. Each split draws from its own stream, so the train rows do not
    depend on the test size."""
    known = dict(sizes)
    if split not in known:
        raise ConfigError(f"task {name!r} has no split {split!r}; known splits: {list(known)}")
    return np.random.default_rng([seed, list(known).index(split)]), known[split]


def sentence(rng: np.random.Generator, label: int) -> str:
    """Filler words with two words of `label`'s sentiment and sometimes one of the other's, shuffled."""
    words = list(rng.choice(FILLER, size=int(rng.integers(5, 10))))
    words += list(rng.choice(SENTIMENT[label], size=2, replace=False))
    if rng.random() < 0.25:
        words.append(str(rng.choice(SENTIMENT[1 - label])))
    rng.shuffle(words)
    return " ".join(str(word) for word in words).capitalize() + "."


SYNTHETIC_FIELDS = {
    "label_words": (" bad", " good"),
    "template": PromptTemplate("{sentence} It was"),
    "sources": {"train": SplitSource(), "test": SplitSource()},
    "text_fields": ("sentence",),
    "label_names": ("negative", "positive"),
}
register(SyntheticTask(name="synthetic", **SYNTHETIC_FIELDS))
