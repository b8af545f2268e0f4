import csv
import json
import time

import numpy as np

from meerkat_fl.models import load_model
from meerkat_fl.tasks import ClassificationData, LabelScorer, encode

loaded = load_model("smollm2"); tok = loaded.tokenizer
W = (" Company", " School", " Artist", " Sports", " Politics", " Transport", " Building", " Nature",
     " Village", " Animal", " Plant", " Music", " Film", " Book")
with open("/work/wt/newcomer/src/meerkat_fl/data/dbpedia/test.csv") as f:
    rows = list(csv.DictReader(f))
texts = [r["text"] for r in rows]; labels = np.array([int(r["label"]) for r in rows])
for tpl in ("{t}\nTopic:", "{t}\nCategory:", "Article: {t}\nThis article is about:", "{t} This is about"):
    data = ClassificationData([tpl.format(t=t) for t in texts], labels, "db")
    enc = encode(tok, data, 64); scorer = LabelScorer(loaded.model, tok, W)
    tic = time.time()
    acc = scorer.accuracy(enc, batch_size=50)
    print(json.dumps({"template": tpl, "n": len(labels), "acc": round(acc, 4), "sec": round(time.time()-tic, 1)}), flush=True)
