"""Rebuild the data shipped inside the package (src/meerkat_fl/data) from a shared/data folder.

    python scripts/build_demo_data.py --data-dir ../shared/data

Writes, and prints the size and sha256 of:
- dbpedia/train.csv, dbpedia/test.csv: a balanced subset of DBpedia-14 (CC BY-SA 3.0 + GFDL), taken from
  shared/data/dbpedia/train_subset_14k.csv.gz (itself drawn from the official DBpedia-14 train set).
  Per class, the rows whose first sentence has at most MAX_WORDS words are ranked by
  sha256(f"{SEED}:{row number}"); the first TEST_PER_CLASS go to test, the next TRAIN_PER_CLASS to train.
  Only the first sentence of each abstract is kept (the source separates sentences with a TAB); the text is
  otherwise unchanged. Columns: label (0..13, classes.txt order), text.
- calibration/wikitext-2/test_head.txt: the first CALIBRATION_LINES lines of WikiText-2's test.txt
  (CC BY-SA 3.0), unchanged: the text the sensitive mask is calibrated on. The shared folder's test.txt sorts
  first there too, so a mask built from either folder sees the same leading tokens.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "meerkat_fl" / "data"
SEED = 0
MAX_WORDS = 60
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 50
CALIBRATION_LINES = 240


def rank(row: int) -> bytes:
    return hashlib.sha256(f"{SEED}:{row}".encode()).digest()


def dbpedia_subset(source: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(train, test) rows (label, first sentence), each sorted by label then source row."""
    by_label: dict[int, list[tuple[int, str]]] = {}
    with gzip.open(source, "rt", encoding="utf-8", newline="") as handle:
        for row, (label, text) in enumerate(csv.reader(handle)):
            sentence = text.split("\t")[0].strip()
            if sentence and len(sentence.split()) <= MAX_WORDS:
                by_label.setdefault(int(label), []).append((row, sentence))
    train, test = [], []
    for label in sorted(by_label):
        chosen = sorted(by_label[label], key=lambda item: rank(item[0]))
        test += [(label, row, text) for row, text in chosen[:TEST_PER_CLASS]]
        train += [(label, row, text) for row, text in chosen[TEST_PER_CLASS : TEST_PER_CLASS + TRAIN_PER_CLASS]]
    strip = lambda rows: [(label, text) for label, _, text in sorted(rows)]
    return strip(train), strip(test)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"{path.relative_to(OUT)}\t{len(data):,} bytes\tsha256 {hashlib.sha256(data).hexdigest()}")


def csv_bytes(rows: list[tuple[int, str]]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "text"])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    data_dir = Path(parser.parse_args().data_dir)
    train, test = dbpedia_subset(data_dir / "dbpedia" / "train_subset_14k.csv.gz")
    write(OUT / "dbpedia" / "train.csv", csv_bytes(train))
    write(OUT / "dbpedia" / "test.csv", csv_bytes(test))
    lines = (data_dir / "calibration" / "wikitext-2" / "test.txt").read_bytes().splitlines(keepends=True)
    write(OUT / "calibration" / "wikitext-2" / "test_head.txt", b"".join(lines[:CALIBRATION_LINES]))


if __name__ == "__main__":
    main()
