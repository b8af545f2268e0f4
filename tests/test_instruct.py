"""The generation task kind: response-only loss, truncation, ROUGE-L, generation, instruction data and its
category partitions (federated rounds on it: test_instruct_methods)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_scoring import _gemma2, _llama

from meerkat_fl import config
from meerkat_fl.build import build_task, partition_for
from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tasks import NO_CATEGORY, get_task, response_logits, response_loss, rouge_l
from meerkat_fl.tasks.generation import encode_rows, generate, generation_metrics
from meerkat_fl.tasks.protocol import TaskProtocol

PROMPTS = ["Name a colour.\n", "Below is a longer instruction about the weather in spring.\n### Response:\n",
           "Hi\n", "Repeat: red blue\n"]
RESPONSES = ["Red.", "It is mild, with rain and some sun in the afternoon.", "Hello there, how are you?", "red blue"]


def scoring_model(kind: str):
    """test_scoring's models, seeded: a plain Llama, or a Gemma-2 whose final logits are soft-capped."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return (_llama() if kind == "llama" else _gemma2()).eval()


@pytest.fixture(scope="module", params=["llama", "gemma2_softcapped"])
def model(request):
    return scoring_model(request.param)


@pytest.fixture()
def rows(tokenizer):
    return encode_rows(tokenizer, PROMPTS, RESPONSES, np.zeros(4), max_length=64, source="inline")


def hand_loss(model, data, indices) -> float:
    """Ground truth: the model's full logits over every position, the response positions picked by hand."""
    losses = []
    for i in indices:
        ids = torch.tensor([data.prompt_ids[i] + data.target_ids[i]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        start = len(data.prompt_ids[i])
        log_probs = F.log_softmax(logits.float(), dim=-1)
        losses += [-log_probs[start - 1 + k, token] for k, token in enumerate(data.target_ids[i])]
    return float(torch.stack(losses).mean())


def test_response_loss_equals_a_hand_masked_cross_entropy(model, rows):
    batch = rows.batch([0, 1, 2, 3])
    assert response_loss(model, batch) == pytest.approx(hand_loss(model, rows, [0, 1, 2, 3]), abs=1e-5)


def test_shared_positions_fallback_gives_the_same_logits(model, rows):
    batch = rows.batch([1, 0, 3])
    assert torch.allclose(response_logits(model, batch, per_row=True), response_logits(model, batch, per_row=False),
                          atol=1e-5)


def test_the_output_head_sees_only_response_positions(rows):
    model = _llama().eval()
    seen = []
    model.lm_head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape))
    batch = rows.batch([0, 1, 2])
    response_loss(model, batch)
    targets = sum(len(rows.target_ids[i]) for i in (0, 1, 2))
    assert seen == [torch.Size([targets, 64])] and targets == int(batch.loss_positions.sum())


def test_batch_targets_are_the_response_tokens_and_eos(tokenizer, rows):
    batch = rows.batch([2, 0])
    expected = rows.target_ids[2] + rows.target_ids[0]
    assert batch.targets.tolist() == expected
    assert rows.target_ids[0] == tokenizer("Red.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    shifted = batch.input_ids[:, 1:][batch.loss_positions[:, :-1]]
    assert shifted.tolist() == expected


def test_truncation_keeps_the_response_and_eos_and_cuts_the_prompt_from_the_left(tokenizer):
    prompt = "word " * 200 + "the cue\n"
    data = encode_rows(tokenizer, [prompt], ["Short answer."], np.zeros(1), max_length=32)
    response = tokenizer("Short answer.", add_special_tokens=False)["input_ids"]
    full_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert data.target_ids[0] == response + [tokenizer.eos_token_id]
    assert data.prompt_ids[0] == full_prompt[-(32 - len(response) - 1):]
    assert data.counts["prompts cut"] == 1 and data.counts["responses cut"] == 0
    assert data.references == ["Short answer."]


def test_prompt_limit_and_response_limit_are_separate(tokenizer):
    response = "one two three four five six seven eight nine ten eleven twelve"
    data = encode_rows(tokenizer, ["a b c d e f g h i j\n"], [response], np.zeros(1), max_length=64,
                       max_prompt_length=4, max_response_length=5)
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert data.target_ids[0] == ids[:5]  # cut: no EOS (the reference does not stop there)
    assert len(data.prompt_ids[0]) == 4 and data.counts["responses cut"] == 1


def test_limits_that_leave_no_prompt_token_are_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="no room"):
        encode_rows(tokenizer, ["x"], ["y"], np.zeros(1), max_length=1)


def test_rows_without_a_response_token_are_counted_and_never_trained_on(tokenizer, caplog):
    data = encode_rows(tokenizer, ["a\n", "b\n", "c\n"], ["yes", "", "no"], np.array([0, 1, 2]), max_length=16)
    assert len(data) == 2 and data.references == ["yes", "no"] and data.categories.tolist() == [0, 2]
    assert data.counts["rows without a response token"] == 1
    assert "left out 1 rows" in caplog.text


@pytest.mark.parametrize("prediction,reference,expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("a dog barked", "the cat sat on the mat", 0.0),
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6
    ("the cat was on the mat", "the cat sat on the mat", 5 / 6),
    # LCS "the cat" = 2; P = 2/2, R = 2/6: F = 2PR/(P+R) = 0.5
    ("The cat", "the cat sat on the mat", 0.5),
    # stemming: "running" and "runs" both stem to "run"
    ("dogs running", "dog runs", 1.0),
])
def test_rouge_l_on_known_strings(prediction, reference, expected):
    assert rouge_l([prediction], [reference]) == pytest.approx(expected)


def test_rouge_l_is_the_mean_over_rows():
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_generation_is_greedy_and_independent_of_left_padding(tiny, rows):
    alone = [generate(tiny.model, rows.subset([i]), 6, batch_size=1, progress=False)[0] for i in range(len(rows))]
    assert generate(tiny.model, rows, 6, batch_size=4, progress=False) == alone
    assert all(isinstance(text, str) for text in alone)


def test_metrics_are_loss_and_rouge_l_by_name(tiny, rows):
    metrics = generation_metrics(tiny.model, rows, batch_size=2, max_new_tokens=4)
    assert set(metrics) == {"loss", "rouge_l"} and 0.0 <= metrics["rouge_l"] <= 1.0
    assert metrics["loss"] == pytest.approx(hand_loss(tiny.model, rows, range(len(rows))), rel=1e-4)
    assert get_task("dolly").primary_metric == "rouge_l"


@pytest.mark.parametrize("name", ["dolly", "alpaca", "instruct", "synthetic_instruct"])
def test_instruction_tasks_implement_the_protocol(name):
    assert isinstance(get_task(name), TaskProtocol)


def test_synthetic_instruct_end_to_end_on_the_tiny_model(tiny):
    task = get_task("synthetic_instruct").configure({"max_new_tokens": 3})
    data = task.encode(tiny.tokenizer, task.load("test").subset(range(6)), 48)
    assert len(data) == 6 and sorted(set(data.categories)) == sorted(set(task.load("test").categories[:6]))
    metrics = task.evaluate(tiny.model, data, batch_size=3)
    assert set(metrics) == {"loss", "rouge_l"} and np.isfinite(metrics["loss"])
    assert task.loss(tiny.model, data.batch([0, 1])) > 0


def test_chat_template_prompt_is_the_tokenizers(tokenizer):
    task = get_task("synthetic_instruct").configure({"template": "chat"})
    data = task.encode(tokenizer, task.load("test").subset([0]), 128)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": _content(task.load("test"), 0)}],
                                             add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert data.prompt_ids[0] == list(expected)


def _content(data, row):
    return f"{data.instructions[row]}\n\n{data.contexts[row]}" if data.contexts[row] else data.instructions[row]


def test_task_settings_flow_from_config_and_are_refused_by_tasks_that_do_not_take_them():
    cfg = config.apply_overrides(config.Config(), ["task.name=dolly", "task.max_new_tokens=8", "task.template=chat",
                                                   "task.max_response_length=40"])
    task = build_task(cfg.task)
    assert (task.max_new_tokens, task.template, task.max_response_length) == (8, "chat", 40)
    with pytest.raises(ConfigError, match="does not take task.max_new_tokens"):
        build_task(config.apply_overrides(config.Config(), ["task.name=sst2", "task.max_new_tokens=8"]).task)
    with pytest.raises(ConfigError, match="task.template"):
        get_task("dolly").configure({"template": "vicuna"})
    with pytest.raises(ConfigError, match="task.loss"):
        get_task("dolly").configure({"loss": "options"})


# --- instruction files -------------------------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_local_jsonl_with_renamed_columns_reads_like_alpaca(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"},
                                              {"instruction": "Greet.", "input": "", "output": "Hi"}])
    task = get_task("instruct").configure({"columns": ["context=input", "response=output"]})
    data = task.load("train", path=path)
    assert (data.instructions, data.contexts, data.responses) == (["Add.", "Greet."], ["1 2", ""], ["3", "Hi"])
    assert data.categories.tolist() == [NO_CATEGORY, NO_CATEGORY]


def test_local_csv_with_categories(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,context,response,category\nSay hi,,hi,chat\nAdd,1 2,3,math\n", encoding="utf-8")
    data = get_task("instruct").configure({"categories": ["math", "chat"]}).load("train", path=path)
    assert data.categories.tolist() == [1, 0] and data.contexts == ["", "1 2"]


@pytest.mark.parametrize("record,message", [
    ({"context": "", "response": "x"}, "line 2: missing column 'instruction'"),
    ({"instruction": "x", "context": ""}, "line 2: missing column 'response'"),
    ({"instruction": "x", "response": ["a"]}, "line 2, field 'response': not text"),
])
def test_a_row_without_instruction_or_response_is_an_error_naming_the_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "response": "ok"}, record])
    with pytest.raises(DataError, match=message):
        get_task("instruct").load("train", path=path)


def test_empty_responses_and_instructions_are_counted_skips(tmp_path, caplog):
    path = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "ok", "response": "fine"},
                                              {"instruction": "ok", "response": "  "},
                                              {"instruction": "", "response": "x"}])
    data = get_task("instruct").load("train", path=path)
    assert len(data) == 1 and data.skipped == {"empty response": 1, "empty instruction": 1}
    assert "1 rows with empty response" in caplog.text


def test_a_file_of_only_empty_responses_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "ok", "response": ""}])
    with pytest.raises(DataError, match="no usable rows"):
        get_task("instruct").load("train", path=path)


def test_non_utf8_text_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        handle.write('{"instruction": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="cannot be read as utf-8"):
        get_task("instruct").load("train", path=path)


def test_an_unknown_category_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "a", "response": "b", "category": "poetry"}])
    with pytest.raises(DataError, match=r"line 1: category 'poetry' is not one of"):
        get_task("dolly").load("train", path=path)


def test_a_bad_column_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="task.columns"):
        get_task("instruct").configure({"columns": ["answer"]})


# --- partitions by category ---------------------------------------------------------------------------------

def _partition(task: str, scheme: str, labels, **extra):
    keys = [f"task.name={task}", f"fed.partition={scheme}", "fed.num_clients=8", "fed.labels_per_client=1",
            *[f"{k}={v}" for k, v in extra.items()]]
    return partition_for(config.apply_overrides(config.Config(), keys), labels)


def test_pathological_gives_each_client_one_category():
    labels = get_task("synthetic_instruct").load("train").partition_labels
    partition = _partition("synthetic_instruct", "pathological", labels, **{"fed.num_clients": 5})
    assert [len(set(labels[c])) for c in partition.clients] == [1] * 5
    assert sorted(int(labels[c][0]) for c in partition.clients) == [0, 1, 2, 3, 4]


def test_data_without_categories_is_iid_only():
    labels = np.full(40, NO_CATEGORY)
    assert sum(len(c) for c in _partition("alpaca", "iid", labels).clients) == 40
    with pytest.raises(ConfigError, match="40 training rows of task 'alpaca' have none: use fed.partition=iid"):
        _partition("alpaca", "dirichlet", labels)


def test_dolly_is_read_with_its_eight_categories(data_dir):
    task = get_task("dolly")
    test = task.load("test", data_dir=data_dir)
    assert len(test) == 80 and np.bincount(test.categories).tolist() == [10] * 8
    train = task.load("train", data_dir=data_dir)
    assert len(train) > 13000 and set(train.categories.tolist()) == set(range(8))
    partition = _partition("dolly", "pathological", train.categories)
    assert sorted(len(set(train.categories[c])) for c in partition.clients) == [1] * 8


def test_alpaca_subset_has_no_category(data_dir):
    data = get_task("alpaca").load("test", data_dir=data_dir)
    assert len(data) == 80 and (data.categories == NO_CATEGORY).all()


def test_partition_command_prints_the_per_client_category_histogram(capsys):
    from meerkat_fl.cli import main

    assert main(["partition", "--task", "synthetic_instruct", "--scheme", "pathological", "--clients", "5"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header == ["client", "kind", "size", "repeat", "reverse", "first", "count", "name", "dominant"]
    assert out.count("100.0%") == 5


def test_a_category_scheme_on_data_without_categories_is_a_one_line_cli_error(tmp_path, capsys):
    from meerkat_fl.cli import main

    path = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"q{i}", "response": "a"} for i in range(20)])
    code = main(["partition", "--task", "instruct", "--scheme", "dirichlet", "--clients", "4",
                 "--set", f"task.train_path={str(path)!r}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "use fed.partition=iid" in err


def test_missing_data_names_the_ways_to_provide_it(tmp_path):
    with pytest.raises(DataError, match=r"no data for task 'dolly' split 'test'.*dolly/test.jsonl.*databricks"):
        get_task("dolly").load("test", data_dir=tmp_path)


def test_a_hub_dataset_id_names_its_instruction_task_and_an_unreachable_hub_is_a_data_error(tmp_path):
    assert get_task("databricks/databricks-dolly-15k").name == "dolly"
    with pytest.raises(DataError, match="Hugging Face 'someone/instructions'"):
        get_task("instruct").load("train", hub="someone/instructions", data_dir=tmp_path)


def test_loss_tensor_is_the_loss_and_differentiable(rows):
    model = scoring_model("llama")
    batch = rows.batch([0, 1])
    loss = get_task("dolly").loss_tensor(model, batch)
    assert float(loss.detach()) == pytest.approx(response_loss(model, batch), abs=1e-6)
    weight = model.model.layers[0].mlp.down_proj.weight
    weight.requires_grad_(True)
    (grad,) = torch.autograd.grad(get_task("dolly").loss_tensor(model, batch), weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
