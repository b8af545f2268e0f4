"""A built-in synthetic instruction task generated in memory: no files, no network, no `datasets`.

`task.name = "synthetic_instruct"` is the generation counterpart of the "synthetic" classification task: a
smoke test anywhere (the tests run every method on it). Each row asks for a small word game on a few colour
words (repeat them, reverse them, give the first, count them) or, without a context, to name a colour; the
game is the row's category, so category partitions apply. Rows are a pure function of the seed and the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meerkat_fl.tasks.instruct import InstructionTask
from meerkat_fl.tasks.instruct_data import InstructionData
from meerkat_fl.tasks.registry import register
from meerkat_fl.tasks.synthetic import split_stream

WORDS = ("red", "blue", "green", "black", "white", "pink", "brown", "grey")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
GAMES = ("repeat", "reverse", "first", "count", "name")


def game_row(rng: np.random.Generator, game: int) -> tuple[str, str, str]:
    """(instruction, context, response) of one row of game `game` (an index into GAMES)."""
    words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)]
    context = " ".join(words)
    if GAMES[game] == "repeat":
        return "Repeat the words.", context, context
    if GAMES[game] == "reverse":
        return "Write the words in reverse order.", context, " ".join(reversed(words))
    if GAMES[game] == "first":
        return "Give the first word.", context, words[0]
    if GAMES[game] == "count":
        return "How many words are there?", context, NUMBERS[len(words)]
    return "Name a colour.", "", words[0]


@dataclass(frozen=True)
class SyntheticInstructions(InstructionTask):
    """Word-game instructions generated from `seed`; `sizes` = rows per split."""

    seed: int = 0
    sizes: tuple[tuple[str, int], ...] = (("train", 400), ("test", 40))

    def load(self, split: str, *, path: str | Path | None = None, data_dir: str | Path | None = None,
             hub: str | None = None) -> InstructionData:
        """Generated rows of `split`; a file `path` or a dataset `hub` is read like any instruction task's."""
        if path is not None or hub is not None:
            return super().load(split, path=path, hub=hub)
        rng, size = split_stream(self.name, self.sizes, self.seed, split)
        games = rng.permutation(np.arange(size) % len(GAMES))
        rows = [game_row(rng, int(game)) for game in games]
        return InstructionData([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], games,
                               f"synthetic:{self.name}:{split}")


register(SyntheticInstructions("synthetic_instruct", {}, categories=GAMES))
