"""Label scoring through the model's own forward: equal to the model's full logits at the answer position.

Run on a plain Llama and on a Gemma-2 whose final logits are soft-capped (tanh), where a hand-made
hidden-state @ lm_head projection would be wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meerkat_fl.tasks import (
    ClassificationData,
    answer_logits,
    classification_loss,
    classification_metrics,
    encode,
    label_logits,
    predict,
)

WORDS = (" terrible", " great")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                         initializer_range=0.2)  # larger than default so label logits differ clearly
    return LlamaForCausalLM(config)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # A strong final soft-cap (Gemma-2 ships 30.0) so capped and uncapped logits differ clearly.
    config = Gemma2Config(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128, initializer_range=0.2,
                          final_logit_softcapping=0.5, sliding_window=4, pad_token_id=0)
    return Gemma2ForCausalLM(config)


@pytest.fixture(scope="module", params=["llama", "gemma2_softcapped"])
def model(request):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        built = _llama() if request.param == "llama" else _gemma2()
    return built.eval()


def full_logits_at_answers(model, batch) -> torch.Tensor:
    """Ground truth: the model's full-vocabulary logits, at each row's last real token, [B, V]."""
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return full[torch.arange(len(batch.labels)), batch.last_index]


def test_label_scores_equal_the_models_own_logits_at_the_answer(model, tokenizer, data):
    encoded = encode(tokenizer, data, WORDS)
    batch = encoded.batch(range(len(data)))
    picked = full_logits_at_answers(model, batch)[:, list(encoded.label_token_ids)]
    expected = F.cross_entropy(picked, batch.labels)
    with torch.no_grad():
        torch.testing.assert_close(label_logits(model, batch), picked, rtol=1e-5, atol=1e-5)
    assert classification_loss(model, batch) == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_array_equal(predict(model, encoded, batch_size=5), picked.argmax(-1).numpy())


def test_softcapped_logits_are_not_a_plain_projection(tokenizer, data):
    # What the old scorer computed (final hidden state @ lm_head rows) is not Gemma-2's score.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gemma = _gemma2().eval()
    batch = encode(tokenizer, data, WORDS).batch(range(len(data)))
    with torch.no_grad():
        hidden = gemma.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        projected = hidden[torch.arange(len(data)), batch.last_index] @ gemma.lm_head.weight.T
        scored = answer_logits(gemma, batch)
    assert scored.abs().max() <= 0.5 + 1e-6  # capped at final_logit_softcapping
    assert not torch.allclose(projected, scored, atol=1e-2)
    torch.testing.assert_close(scored, 0.5 * torch.tanh(projected / 0.5), rtol=1e-5, atol=1e-5)


def test_label_logits_do_not_depend_on_padding_or_batch_mates(model, tokenizer, data):
    encoded = encode(tokenizer, data, WORDS)
    short = 1  # "bad. It was": padded a lot next to the long prompt
    with torch.no_grad():
        alone = label_logits(model, encoded.batch([short]))
        final = model(input_ids=torch.tensor([encoded.token_ids[short]])).logits[0, -1]
        torch.testing.assert_close(alone[0], final[list(encoded.label_token_ids)], rtol=1e-5, atol=1e-5)
        padded = encoded.batch([2, short, 0])
        assert padded.attention_mask[1].sum() < padded.input_ids.shape[1]
        torch.testing.assert_close(label_logits(model, padded)[1:2], alone, rtol=1e-5, atol=1e-5)


def test_the_output_head_sees_one_position_per_row(model, tokenizer, data):
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(args[0].shape))
    try:
        with torch.no_grad():
            label_logits(model, encode(tokenizer, data, WORDS).batch([0, 1, 2]))
    finally:
        hook.remove()
    assert [tuple(s[:2]) for s in shapes] == [(3, 1)]


def test_shared_positions_fallback_gives_the_same_logits(model, tokenizer, data):
    # transformers 4.x takes one list of positions for every row; each row then picks its own.
    batch = encode(tokenizer, data, WORDS).batch(range(len(data)))
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(model, batch, per_row=False), answer_logits(model, batch, per_row=True),
                                   rtol=1e-5, atol=1e-5)


def test_metrics_are_accuracy_and_mean_loss_by_name(model, tokenizer, data):
    encoded = encode(tokenizer, data, WORDS)
    with torch.no_grad():
        argmax = label_logits(model, encoded.batch(range(len(data)))).argmax(-1).numpy()
    labels = argmax.copy()
    labels[:2] = 1 - labels[:2]  # two wrong on purpose: accuracy must be 3/5
    encoded = encode(tokenizer, ClassificationData(data.prompts, labels, "inline"), WORDS)
    metrics = classification_metrics(model, encoded, batch_size=2)
    assert set(metrics) == {"accuracy", "loss"}
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["loss"] == pytest.approx(classification_loss(model, encoded.batch(range(len(data)))), rel=1e-5)
