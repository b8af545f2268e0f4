"""Research (issue 16 item 3): zero-shot accuracy of the embedded model on a few task/template pairs."""
import csv
import gzip
import json
import sys
import time

import numpy as np

from meerkat_fl.models import load_model
from meerkat_fl.tasks import ClassificationData, LabelScorer, encode, get_task

loaded = load_model("smollm2")
tok = loaded.tokenizer
DB_WORDS = [" Company", " School", " Artist", " Athlete", " Politician", " Vehicle", " Building", " Nature",
            " Village", " Animal", " Plant", " Album", " Film", " Book"]
for w in DB_WORDS:
    print(repr(w), tok(w, add_special_tokens=False)["input_ids"])
sys.stdout.flush()

rows = []
with gzip.open("/work/shared/data/dbpedia/train_subset_14k.csv.gz", "rt") as f:
    for label, text in csv.reader(f):
        rows.append((int(label), text.split("\t")[0].strip()))
rng = np.random.default_rng(0)
pick = rng.permutation(len(rows))[:700]
texts = [rows[i][1] for i in pick]; labels = np.array([rows[i][0] for i in pick])

def run(name, words, template, texts, labels, max_length=64):
    data = ClassificationData([template.format(t=t) for t in texts], labels, name)
    enc = encode(tok, data, max_length)
    scorer = LabelScorer(loaded.model, tok, words)
    tic = time.time()
    acc = scorer.accuracy(enc, batch_size=50)
    print(json.dumps({"task": name, "template": template, "n": len(labels), "acc": round(acc, 4),
                      "sec": round(time.time() - tic, 1)}), flush=True)

if all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in DB_WORDS):
    for tpl in ("{t}\nTopic:", "{t}\nThis article is about a", "Article: {t}\nCategory:"):
        run("dbpedia", DB_WORDS, tpl, texts, labels)

sst = get_task("sst2").load("test", data_dir="/work/shared/data")
idx = np.random.default_rng(1).permutation(len(sst))[:500]
sents = [sst.prompts[i][: -len(" It was")] for i in idx]; sl = sst.labels[idx]
for words in ((" terrible", " great"), (" negative", " positive")):
    for tpl in ("{t} It was", "Review: {t}\nSentiment:"):
        run("sst2", words, tpl, sents, sl)
