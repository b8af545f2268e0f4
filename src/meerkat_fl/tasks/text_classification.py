"""Single-text classification tasks (AG News, Yelp, SST-5, MR, CR, Subj, TREC, DBpedia), registered on import.

Verbalizers follow MeZO / LM-BFF where those define one. Label order follows the Hugging Face
datasets unless a `label_map` says otherwise. MR, CR and Subj have one labelled file each, split
70/30 into train/test (seeded, stratified; task.HOLDOUT_SEED).
"""

from __future__ import annotations

from dataclasses import replace

from meerkat_fl.tasks.registry import register
from meerkat_fl.tasks.sources import (
    FileSource,
    HubSource,
    SplitSource,
    holdout,
    hub_pair,
    lines,
    same,
    train_test,
)
from meerkat_fl.tasks.task import PromptTemplate, Task

SENTIMENT = (" terrible", " great")

_ag_hub = hub_pair("fancyzhx/ag_news", None, same("text"), test_split="test")
register(
    Task(
        name="ag_news",
        label_words=(" World", " Sports", " Business", " Technology"),
        template=PromptTemplate("{text}\nTopic:"),
        sources=train_test(
            FileSource("ag_news/train_subset_10k.tsv", same("text"), columns=("text", "label")),
            # description column only, matching the description-only train subset; classes 1..4 -> 0..3
            FileSource(
                "ag_news/test.csv",
                same("text"),
                columns=("label", "title", "text"),
                label_map={"1": 0, "2": 1, "3": 2, "4": 3},
            ),
            _ag_hub,
        ),
        text_fields=("text",),
        label_names=("World", "Sports", "Business", "Sci/Tech"),
    )
)

# No local copy exists (shared/data/SOURCES.md): a file given by path, or the hub.
register(
    Task(
        name="yelp_polarity",
        label_words=SENTIMENT,
        template=PromptTemplate("{text} It was"),
        sources=train_test(
            None, None, hub_pair("fancyzhx/yelp_polarity", None, same("text"), test_split="test")
        ),
        text_fields=("text",),
        label_names=("negative", "positive"),
    )
)

_sst5_hub = HubSource("SetFit/sst5", None, "train", {"text": "sentence"})
register(
    Task(
        name="sst5",
        label_words=(" terrible", " bad", " okay", " good", " great"),
        template=PromptTemplate("{sentence} It was"),
        sources={
            split: SplitSource(lines(f"sst5/stsa.fine.{suffix}"), replace(_sst5_hub, split=split))
            for split, suffix in (("train", "train"), ("validation", "dev"), ("test", "test"))
        },
        text_fields=("sentence",),
        label_names=("very negative", "negative", "neutral", "positive", "very positive"),
    )
)

register(
    Task(
        name="mr",
        label_words=SENTIMENT,
        template=PromptTemplate("{sentence} It was"),
        sources=holdout(
            lines("mr/rt-polarity.all", encoding="latin-1"),
            hub_pair("cornell-movie-review-data/rotten_tomatoes", None, {"text": "sentence"}, "test"),
        ),
        text_fields=("sentence",),
        label_names=("negative", "positive"),
    )
)

register(
    Task(
        name="cr",
        label_words=SENTIMENT,
        template=PromptTemplate("{sentence} It was"),
        sources=holdout(lines("cr/custrev.all", drop_empty=True)),  # 4 of 3,775 rows have no text
        text_fields=("sentence",),
        label_names=("negative", "positive"),
    )
)

register(
    Task(
        name="subj",
        label_words=(" subjective", " objective"),
        template=PromptTemplate("{sentence} This is"),
        sources=holdout(lines("subj/subj.all", encoding="latin-1")),
        text_fields=("sentence",),
        label_names=("subjective", "objective"),
    )
)

# Local coarse ids are 0 DESC, 1 ENTY, 2 ABBR, 3 HUM, 4 LOC, 5 NUM; the hub orders ABBR, ENTY, DESC, ...
_trec_hub = hub_pair(
    "CogComp/trec",
    None,
    {"text": "question"},
    "test",
    label_column="coarse_label",
    label_map={"0": 2, "1": 1, "2": 0, "3": 3, "4": 4, "5": 5},
)
register(
    Task(
        name="trec",
        label_words=(" Description", " Entity", " Expression", " Human", " Location", " Number"),
        template=PromptTemplate("{question}\nAnswer type:"),
        sources=train_test(
            lines("trec/TREC.train.all", "question", encoding="latin-1"),
            lines("trec/TREC.test.all", "question", encoding="latin-1"),
            _trec_hub,
        ),
        text_fields=("question",),
        label_names=("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"),
    )
)

# DBpedia-14: the demo's task. Locally only the subset shipped in meerkat_fl/data (first sentence of each
# abstract; a user's data_dir holding dbpedia/train.csv and test.csv takes precedence); the hub has the full
# sets, whose `content` column is the whole abstract. One single-token word per class [choice]; of the
# templates measured zero-shot on the shipped test set (SmolLM2-135M, 700 rows), "Category:" scored 0.66,
# "Topic:" 0.48, "This article is about:" 0.42.
register(
    Task(
        name="dbpedia",
        label_words=(" Company", " School", " Artist", " Sports", " Politics", " Transport", " Building",
                     " Nature", " Village", " Animal", " Plant", " Music", " Film", " Book"),
        template=PromptTemplate("{text}\nCategory:"),
        sources=train_test(
            FileSource("dbpedia/train.csv", same("text")),
            FileSource("dbpedia/test.csv", same("text")),
            hub_pair("fancyzhx/dbpedia_14", None, {"content": "text"}, test_split="test"),
        ),
        text_fields=("text",),
        label_names=("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                     "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                     "Album", "Film", "WrittenWork"),
    )
)
