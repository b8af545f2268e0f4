"""task.loss = "options" (MeZO's train_as_classification): each option's mean log-probability over the full
vocabulary, cross-entropy over the options; multi-token options; the run summary records the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_instruct import scoring_model

from meerkat_fl import config
from meerkat_fl.errors import ConfigError
from meerkat_fl.tasks import classification_loss, encode, get_task
from meerkat_fl.tasks.options import encode_options, option_scores, options_loss, options_metrics

MULTI = (" Abbreviation", " Number", " great")  # the first two are several tokens under SmolLM2


@pytest.fixture(scope="module", params=["llama", "gemma2_softcapped"])
def model(request):
    return scoring_model(request.param)


def hand_scores(model, tokenizer, prompt: str, options) -> torch.Tensor:
    """Ground truth: full logits of prompt + option, mean log-prob of the option's tokens, per option."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for option in options:
        option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + option_ids])).logits[0].float()
        log_probs = F.log_softmax(logits, dim=-1)
        start = len(prompt_ids)
        scores.append(torch.stack([log_probs[start - 1 + k, t] for k, t in enumerate(option_ids)]).mean())
    return torch.stack(scores)


def test_option_scores_are_mean_log_probs_of_multi_token_options(model, tokenizer, data):
    assert any(len(tokenizer(o, add_special_tokens=False)["input_ids"]) > 1 for o in MULTI)
    labels = np.array([0, 1, 2, 0, 1])
    encoded = encode_options(tokenizer, type(data)(data.prompts, labels, "inline"), MULTI, 64)
    batch = encoded.batch(range(5))
    expected = torch.stack([hand_scores(model, tokenizer, p, MULTI) for p in data.prompts])
    assert torch.allclose(option_scores(model, batch), expected, atol=1e-5)
    assert options_loss(model, batch) == pytest.approx(float(F.cross_entropy(expected, torch.tensor(labels))), abs=1e-5)


def test_single_token_options_give_the_verbalizer_loss(model, tokenizer, data):
    # log-softmax over the full vocabulary shifts every option of a row by the same log Z: the cross-entropy
    # over options equals the one over the label words' logits
    words = (" terrible", " great")
    options = options_loss(model, encode_options(tokenizer, data, words, 64).batch(range(5)))
    assert options == pytest.approx(classification_loss(model, encode(tokenizer, data, words).batch(range(5))), abs=1e-5)


def test_options_metrics_match_batch_scores(model, tokenizer, data):
    encoded = encode_options(tokenizer, data, (" terrible", " great"), 64)
    metrics = options_metrics(model, encoded, batch_size=4)
    with torch.no_grad():
        scores = option_scores(model, encoded.batch(range(5)))
    assert metrics["accuracy"] == pytest.approx(float((scores.argmax(-1) == torch.tensor(data.labels)).float().mean()))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(scores, torch.tensor(data.labels))), abs=1e-5)


def test_a_task_with_the_options_loss_trains_and_evaluates_through_the_protocol(tiny):
    task = get_task("synthetic").configure({"loss": "options"})
    assert task.loss_name == "options" and get_task("synthetic").loss_name == "verbalizer"
    data = task.encode(tiny.tokenizer, task.load("test").subset(range(8)), 32)
    assert np.isfinite(task.loss(tiny.model, data.batch([0, 1, 2])))
    assert set(task.evaluate(tiny.model, data, batch_size=8)) == {"accuracy", "loss"}


def test_an_unknown_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="task.loss: must be one of verbalizer, options"):
        get_task("sst2").configure({"loss": "mean"})


def test_the_run_summary_records_the_loss(tiny_cfg, tmp_path):
    from meerkat_fl.fed.simulate import simulate

    cfg = config.apply_overrides(tiny_cfg, ["task.loss=options", "fed.rounds=1", "task.eval_size=8",
                                            "task.train_size=40"])
    summary = simulate(config.validate(cfg), tmp_path / "run", progress=False)
    assert summary["task_loss"] == "options" and summary["final/accuracy"] is not None
    assert "loss = \"options\"" in (tmp_path / "run" / "config.toml").read_text()
