"""Hostile messages for the decoders: structured header mutations, random bytes and byte flips.

Used by the fuzz test (``tests/test_messages.py``, a bounded seeded sample) and by ``benchmarks/fuzz.py``
(many more cases, cases per second). The contract checked (``check``): a decoder either returns values
that the validators then accept or reject with MessageRejected, or raises MessageRejected itself; never
another exception type. Only the public encode/decode/validate functions are used, so the same cases run
against any version of ``fed/messages.py``.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from meerkat_fl.errors import MessageRejected
from meerkat_fl.fed import messages as m

MAGIC, PREFIX = b"MKT1", 9
# Raw JSON texts put in place of a field: each is a way a number or a name can be wrong.
HOSTILE = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e308", "100000000000000000000000000000",
           "-100000000000000000000000000000", "9223372036854775808", "-1", "0", "0.5", "-0.0", "true", "false",
           "null", '"x"', '""', "[]", "[1]", "[[]]", "{}", '{"a":1}', '["seeds","int64",1]', "1" * 5000)


@dataclass(frozen=True)
class Case:
    family: str  # structured | nesting | random | flip | truncate
    what: str  # a short description, for failure reports
    kind: str  # plan | update
    data: bytes


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    failure: str | None  # "TypeError: ..." when something other than MessageRejected escaped
    seconds: float


def samples() -> dict[str, tuple[str, bytes]]:
    """Valid messages of every shape: a plan per downlink, and a reply."""
    seeds = np.arange(1, 4, dtype=np.int64)
    path = m.ClientPath(0, 1, 0.5, 1e-2, np.array([7, 8], np.int64), np.array([0.25, -1.5], np.float32))
    base = {"round": 1, "client_id": 0, "seeds": seeds, "lr": 1e-2, "eps": 1e-3, "batch_size": 4}
    return {
        "plan_values": ("plan", m.encode_plan(m.RoundPlan(**base, values=np.linspace(-1, 1, 6, dtype=np.float32)))),
        "plan_scalars": ("plan", m.encode_plan(m.RoundPlan(**base, paths=(path, path), synced_round=-1))),
        "plan_pool": ("plan", m.encode_plan(m.RoundPlan(**base, synced_round=0, pool_size=8,
                                                       pool_positions=np.array([1, 5], np.int32),
                                                       pool_coefficients=np.array([0.5, -0.25], np.float32)))),
        "update": ("update", m.encode_update(m.ClientUpdate(1, 0, np.array([0.5, -1.0, 2.0], np.float32),
                                                           np.array([0.7, 0.6, 0.5], np.float32), 17,
                                                           {"skipped_steps": 0.0}))),
    }


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    """(prefix, parsed header, array payload) of a valid frame."""
    (length,) = struct.unpack("<I", data[5:PREFIX])
    return data[:5], json.loads(data[PREFIX : PREFIX + length]), data[PREFIX + length :]


def frame(prefix: bytes, header_text: bytes, payload: bytes) -> bytes:
    return prefix + struct.pack("<I", len(header_text)) + header_text + payload


def _slots(value, path=()) -> Iterator[tuple]:
    """Every position in a parsed header (dict keys and list indices), depth first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*path, key)
        yield from _slots(child, (*path, key))


def _replaced(header, slot: tuple, raw: str) -> bytes:
    marker = "\u0000MARK\u0000"
    copy = json.loads(json.dumps(header))
    target = copy
    for key in slot[:-1]:
        target = target[key]
    target[slot[-1]] = marker
    return json.dumps(copy, separators=(",", ":")).replace(json.dumps(marker), raw).encode()


def structured(name: str, kind: str, data: bytes) -> Iterator[Case]:
    """Each slot of the header set to each hostile value; then whole-header and array-spec mutations."""
    prefix, header, payload = split(data)
    for slot in _slots(header):
        for raw in HOSTILE:
            yield Case("structured", f"{name}:{'.'.join(map(str, slot))}={raw[:20]}", kind,
                       frame(prefix, _replaced(header, slot, raw), payload))
    specs = header["arrays"]
    variants = {
        "duplicate_array": specs + specs[:1],
        "list_as_name": [[[s[0]], s[1], s[2]] for s in specs],
        "dict_spec": [{"name": s[0]} for s in specs],
        "missing_arrays": [],
        "unknown_array": [["evil", "float32", 0], *specs],
        "swapped_dtype": [[s[0], "int64" if s[1] == "float32" else "float32", s[2]] for s in specs],
        "huge_count": [[s[0], s[1], 2**62] for s in specs],
        "negative_count": [[s[0], s[1], -1] for s in specs],
        "many_specs": specs * 1000,
    }
    for what, value in variants.items():
        yield Case("structured", f"{name}:{what}", kind,
                   frame(prefix, json.dumps({**header, "arrays": value}).encode(), payload))
    body = json.dumps(header)[1:-1]
    for what, text in {"duplicate_key": "{" + body + "," + body + "}", "unknown_key": '{"evil":1,' + body + "}",
                       "list_header": "[" + json.dumps(header) + "]", "number_header": "1",
                       "string_header": '"x"', "empty_header": "", "utf16": None, "bad_utf8": None}.items():
        if what == "utf16":
            raw = json.dumps(header).encode("utf-16")
        elif what == "bad_utf8":
            raw = json.dumps(header).encode()[:-1] + b"\xff}"
        else:
            raw = text.encode()
        yield Case("structured", f"{name}:{what}", kind, frame(prefix, raw, payload))


def nesting(name: str, kind: str, data: bytes) -> Iterator[Case]:
    """Deep nesting under the header size limit, in a field, in the array list and inside strings."""
    prefix, header, payload = split(data)
    body = json.dumps(header)[1:-1]
    for depth in (20, 1000, 100_000, 500_000):
        for what, text in {"field": '{"round":' + "[" * depth + "]" * depth + "," + body + "}",
                           "unclosed": '{"round":' + "[" * depth + "," + body + "}",
                           "objects": '{"metrics":' + '{"a":' * depth + "1" + "}" * depth + "," + body + "}",
                           "in_string": '{"x":"' + "[" * depth + '",' + body + "}"}.items():
            yield Case("nesting", f"{name}:{what}@{depth}", kind, frame(prefix, text.encode(), payload))


def random_cases(rng: np.random.Generator, sample: dict[str, tuple[str, bytes]], count: int) -> Iterator[Case]:
    """Random bytes (with and without a valid prefix), byte flips and truncations of valid messages."""
    names = sorted(sample)
    for index in range(count):
        name = names[index % len(names)]
        kind, data = sample[name]
        family = ("random", "prefixed", "flip", "truncate")[rng.integers(4)]
        if family == "random":
            out = rng.bytes(int(rng.integers(0, 256)))
        elif family == "prefixed":
            out = data[:5] + rng.bytes(int(rng.integers(0, 256)))
        elif family == "flip":
            buf = bytearray(data)
            for _ in range(int(rng.integers(1, 9))):
                buf[rng.integers(len(buf))] ^= 1 << int(rng.integers(8))
            out = bytes(buf)
        else:
            out = data[: int(rng.integers(len(data)))]
        yield Case(family, f"{name}:{family}#{index}", kind, out)


def all_structured() -> Iterator[Case]:
    for name, (kind, data) in samples().items():
        yield from structured(name, kind, data)
        yield from nesting(name, kind, data)


def check(case: Case) -> Outcome:
    """Decode ``case`` and run the validators on what decodes; a failure is any other exception escaping."""
    tic = time.perf_counter()
    try:
        if case.kind == "plan":
            plan = m.decode_plan(case.data)
            if hasattr(m, "validate_plan"):  # older versions had none
                m.validate_plan(plan, m.PlanLimits(max_batch_size=64, max_local_steps=16))
        else:
            update = m.decode_update(case.data)
            seeds = np.zeros(update.scalars.size, np.int64)
            m.validate_update(update, m.RoundPlan(update.round, update.client_id, seeds, 1e-2, 1e-3, 4), 1e6)
        accepted = True
    except MessageRejected:
        accepted = False
    except Exception as exc:  # noqa: BLE001 - the point: any other type is the failure being looked for
        return Outcome(False, f"{type(exc).__name__}: {str(exc)[:120]}", time.perf_counter() - tic)
    return Outcome(accepted, None, time.perf_counter() - tic)


def run(cases: Iterator[Case], on_failure: Callable[[Case, Outcome], None] | None = None) -> dict:
    """Check every case; counts per family, failures (first 20) and the slowest case's seconds."""
    counts: dict[str, dict[str, int]] = {}
    failures, slowest = [], 0.0
    for case in cases:
        outcome = check(case)
        row = counts.setdefault(case.family, {"cases": 0, "accepted": 0, "rejected": 0, "failed": 0})
        row["cases"] += 1
        row["failed" if outcome.failure else "accepted" if outcome.accepted else "rejected"] += 1
        slowest = max(slowest, outcome.seconds)
        if outcome.failure:
            if len(failures) < 20:
                failures.append({"case": case.what, "error": outcome.failure})
            if on_failure is not None:
                on_failure(case, outcome)
    return {"families": counts, "failures": failures, "slowest_case_seconds": slowest,
            "cases": sum(r["cases"] for r in counts.values()), "failed": sum(r["failed"] for r in counts.values())}
