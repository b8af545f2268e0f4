"""The round loop, on one screen: configure, send, aggregate, observe, evaluate, log, checkpoint.

Driven by the in-process simulator and by the Flower ServerApp (only the transport differs). It takes plain
callables for everything that touches files or the model, so it knows nothing of run folders or tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meerkat_fl.fed.server import RoundResult, Server
from meerkat_fl.fed.transport import Transport
from meerkat_fl.progress import Progress, bar, postfix
from meerkat_fl.rundir import EVAL, prefixed

Metrics = dict[str, float]


def round_record(result: RoundResult, seconds: float) -> dict[str, Any]:
    """One metrics.jsonl line for a round (evaluation metrics are added by the loop)."""
    return {
        "round": result.round + 1,
        "train_loss": result.train_loss,
        "bytes_up": sum(result.bytes_up.values()),
        "bytes_down": sum(result.bytes_down.values()),
        "seconds": seconds,
        "clients": result.accepted,
        "rejected": {str(k): v for k, v in result.rejected.items()},
        "bytes_up_by_client": {str(k): v for k, v in result.bytes_up.items()},
        "bytes_down_by_client": {str(k): v for k, v in result.bytes_down.items()},
        "train_loss_by_client": {str(k): v for k, v in result.train_loss_by_client.items()},
        **result.metrics,
    }


def run_rounds(
    server: Server, transport: Transport, *, rounds: int, eval_every: int, checkpoint_every: int,
    evaluate: Callable[[], Metrics], log: Callable[[dict[str, Any]], None], checkpoint: Callable[[], None],
    observe: Callable[[RoundResult], None] = lambda result: None, stop_after: int | None = None,
    progress: Progress = True, desc: str = "rounds", last_eval: Metrics | None = None, bytes_before: int = 0,
) -> Metrics | None:
    """Run rounds from ``server.round`` up to ``rounds`` (or ``stop_after``); returns the last evaluation.

    The bar shows the round, its train loss, the last evaluation and the bytes up + down so far (``last_eval``
    and ``bytes_before``: those of the rounds a resumed run already has).

    A round's ``observe`` output (e.g. GradIP lines) is written before its metrics line, and a checkpoint after
    it, so a run killed anywhere resumes from a consistent point. Stopping early checkpoints where it stops.
    """
    every = eval_every or rounds
    rounds_bar = bar(rounds, desc, "round", progress, initial=server.round)
    total_bytes = bytes_before
    while server.round < rounds and (stop_after is None or server.round < stop_after):
        tic = time.perf_counter()
        plans, encoded = server.configure_round()
        result = server.aggregate_round(plans, encoded, transport.send_and_receive(encoded))
        observe(result)
        done = result.round + 1
        record = round_record(result, time.perf_counter() - tic)
        if done % every == 0 or done == rounds:
            last_eval = evaluate()
            record.update(prefixed(EVAL, last_eval))
        record.update(getattr(transport, "round_metrics", dict)())  # e.g. Flower's wire bytes per round
        log(record)
        if done % checkpoint_every == 0 or done == rounds:
            checkpoint()
        total_bytes += record["bytes_up"] + record["bytes_down"]
        rounds_bar.update(1)
        rounds_bar.set_postfix(postfix(result.train_loss, last_eval, total_bytes))
    rounds_bar.close()
    if server.round < rounds and server.round % checkpoint_every:  # stopped early: resume continues from here
        checkpoint()
    return last_eval
