"""Packing against transformers, excess-length strategies, and the deterministic, resumable, per-host batches
(easytune/data/pipeline.py).

References: ``transformers.LlamaForCausalLM`` run on each document alone (logits and summed cross-entropy
with labels -100 on unsupervised tokens) for the packed rows; NumPy slicing for the host split.
"""

import numpy as np
import pytest

from easytune.data import pipeline
from tests.helpers import save_tiny_hf_llama


def _ex(ids, mask):
    return {"input_ids": list(ids), "loss_mask": list(mask)}


def test_packed_logits_and_loss_equal_each_document_alone(tmp_path):
    import jax.numpy as jnp
    import optax
    import torch

    from easytune.models import hf, llama
    torch_model = save_tiny_hf_llama(tmp_path / "m", vocab=96)
    cfg, params = hf.load_hf_model(tmp_path / "m")
    rng = np.random.default_rng(0)
    docs = []
    for n in (7, 12, 5):
        ids = rng.integers(3, 96, n).tolist()
        p = int(rng.integers(1, n - 1))
        docs.append(_ex(ids, [0] * p + [1] * (n - p)))
    T = 24
    packed = pipeline.build_sequences(docs, T, packing=True)
    assert packed["input_ids"].shape == (1, T) and packed["segment_ids"].max() == 3
    unpacked = pipeline.build_sequences(docs, T, packing=False)
    # one forward pass (one compilation): row 0 the pack, rows 1-3 the documents unpacked
    both = {k: np.concatenate([packed[k], unpacked[k]]) for k in packed}
    model = llama.LlamaForCausalLM(cfg)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(both["input_ids"]),
                                    positions=jnp.asarray(both["positions"]),
                                    segment_ids=jnp.asarray(both["segment_ids"])))
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), both["target_ids"]))
    ref_sum, ref_tokens = 0.0, 0
    for seg, doc in enumerate(docs, start=1):
        ids = torch.tensor([doc["input_ids"]])
        labels = torch.tensor([[t if m else -100 for t, m in zip(doc["input_ids"], doc["loss_mask"])]])
        with torch.no_grad():  # HF's shifted loss (mean over supervised targets) and logits, the doc alone
            out = torch_model(ids, labels=labels)
        cols = np.flatnonzero(packed["segment_ids"][0] == seg)
        np.testing.assert_allclose(logits[0, cols], out.logits[0, :-1].numpy(), atol=1e-4, rtol=1e-4)
        k = int(sum(doc["loss_mask"][1:]))
        ref_sum += out.loss.item() * k
        ref_tokens += k
    mask = both["loss_mask"]
    assert mask[0].sum() == mask[1:].sum() == ref_tokens
    # packed and unpacked token-weighted losses both equal transformers' per-document sums / supervised tokens
    np.testing.assert_allclose((ce[0] * mask[0]).sum() / mask[0].sum(), ref_sum / ref_tokens, rtol=1e-5)
    np.testing.assert_allclose((ce[1:] * mask[1:]).sum() / mask[1:].sum(), ref_sum / ref_tokens, rtol=1e-5)


def test_excess_length_strategies():
    exs = [dict(_ex(range(3, 8), [0, 1, 1, 1, 1]), _source="a:1"), dict(_ex(range(3, 20), [0] * 17), _source="a:2")]
    assert pipeline.apply_excess_length(exs, 8, "truncate") == (exs, 0)
    assert pipeline.apply_excess_length(exs, 8, "drop") == ([exs[0]], 1)
    with pytest.raises(ValueError, match=r"a:2: example has 17 tokens, more than data\.sequence_len \+ 1 = 9"):
        pipeline.apply_excess_length(exs, 8, "raise")
    with pytest.raises(ValueError, match="excess_length_strategy"):
        pipeline.apply_excess_length(exs, 8, "cut")


def test_examples_whose_supervision_is_truncated_away_are_dropped():
    exs = [dict(_ex(range(3, 15), [0] * 10 + [1, 1]), _source="a:1"), dict(_ex(range(3, 8), [0, 0, 1, 1, 1]),
                                                                           _source="a:2")]
    kept, dropped = pipeline.drop_unsupervised(exs, 8)
    assert kept == [exs[1]] and dropped == ["a:1"]


def test_length_histogram_bins_cover_every_example_once():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 300, 200).tolist()
    hist = pipeline.length_histogram(lengths, bins=8)
    assert len(hist) <= 8 and sum(c for _, _, c in hist) == 200
    for lo, hi, c in hist:  # reference: a plain count per inclusive bin
        assert c == sum(lo <= n <= hi for n in lengths)
    assert hist[0][0] == min(lengths) and hist[-1][1] >= max(lengths)
