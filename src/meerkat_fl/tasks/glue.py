"""GLUE and SuperGLUE tasks (SST-2, RTE, BoolQ, WiC, WSC, CB), registered on import.

Label order follows the Hugging Face datasets, so hub labels need no mapping. SuperGLUE has only
its official validation sets locally (shared/data/SOURCES.md), so those are split 70/30 into
train/test (seeded, stratified; task.HOLDOUT_SEED); from the hub, train/validation are used.
"""

from __future__ import annotations

from meerkat_fl.tasks.registry import register
from meerkat_fl.tasks.sources import FileSource, SplitSource, holdout, hub_pair, same, train_test
from meerkat_fl.tasks.task import PromptTemplate, Task

GLUE = "nyu-mll/glue"
SUPERGLUE = "aps/super_glue"
NO_YES = (" No", " Yes")


def _superglue(
    folder: str, config: str, fields: dict[str, str], hub_fields: dict[str, str]
) -> dict[str, SplitSource]:
    return holdout(
        FileSource(f"superglue/{folder}/val.jsonl", fields), hub_pair(SUPERGLUE, config, hub_fields)
    )


# MeZO's template and verbalizer; GLUE dev is the standard evaluation split, so test = validation = dev.
_sst2 = train_test(
    FileSource("sst2/train.tsv.gz", same("sentence")),
    FileSource("sst2/dev.tsv", {"content": "sentence"}),
    hub_pair(GLUE, "sst2", same("sentence")),
)
register(
    Task(
        name="sst2",
        label_words=(" terrible", " great"),
        template=PromptTemplate("{sentence} It was"),
        sources={**_sst2, "validation": _sst2["test"]},
        text_fields=("sentence",),
        label_names=("negative", "positive"),
    )
)

_rte = train_test(
    FileSource("rte/train.tsv", same("sentence1", "sentence2")),
    FileSource("rte/dev.tsv", same("sentence1", "sentence2")),
    hub_pair(GLUE, "rte", same("sentence1", "sentence2")),
)
register(
    Task(
        name="rte",
        label_words=(" True", " False"),  # entailment -> True
        template=PromptTemplate("{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"),
        sources={**_rte, "validation": _rte["test"]},
        text_fields=("sentence1", "sentence2"),
        label_names=("entailment", "not_entailment"),
    )
)

register(
    Task(
        name="boolq",
        label_words=NO_YES,
        template=PromptTemplate("{passage}\nQuestion: {question}?\nAnswer:"),
        sources=_superglue("BoolQ", "boolq", same("passage", "question"), same("passage", "question")),
        text_fields=("passage", "question"),
        label_names=("False", "True"),
    )
)

_wic_fields = same("word", "sentence1", "sentence2")
register(
    Task(
        name="wic",
        label_words=NO_YES,
        template=PromptTemplate(
            '{sentence1}\n{sentence2}\nQuestion: Is the word "{word}" used with the same meaning'
            " in both sentences?\nAnswer:"
        ),
        sources=_superglue("WiC", "wic", _wic_fields, _wic_fields),
        text_fields=("word", "sentence1", "sentence2"),
        label_names=("False", "True"),
    )
)

_wsc_local = {"text": "text", "target.span1_text": "span1_text", "target.span2_text": "span2_text"}
register(
    Task(
        name="wsc",
        label_words=NO_YES,
        template=PromptTemplate(
            '{text}\nQuestion: In the passage above, does "{span2_text}" refer to "{span1_text}"?\nAnswer:'
        ),
        sources=_superglue("WSC", "wsc.fixed", _wsc_local, same("text", "span1_text", "span2_text")),
        text_fields=("text", "span1_text", "span2_text"),
        label_names=("False", "True"),
    )
)

register(
    Task(
        name="cb",
        label_words=(" True", " False", " Neither"),
        template=PromptTemplate("{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:"),
        sources=_superglue("CB", "cb", same("premise", "hypothesis"), same("premise", "hypothesis")),
        text_fields=("premise", "hypothesis"),
        label_names=("entailment", "contradiction", "neutral"),
    )
)
