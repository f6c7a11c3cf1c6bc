"""Examples -> sequences (easytune/data/sequences.py): split, shift, pack, pad, chunk; packing against transformers;
excess-length strategies, unsupervised drops and length histograms.

References: ``transformers.LlamaForCausalLM`` run on each document alone (logits and summed cross-entropy
with labels -100 on unsupervised tokens) for the packed rows; ``datasets.train_test_split``'s rounding of a
fractional validation size.
"""

import numpy as np
import pytest

from easytune.data import sequences
from tests.helpers import save_tiny_hf_llama


def _ex(ids, mask=None):
    return {"input_ids": list(ids), "loss_mask": list(mask) if mask is not None else [0] + [1] * (len(ids) - 1)}


def check_invariants(seqs, T):
    """Properties every sequences dict must have (SPEC Data section)."""
    assert set(seqs) == set(sequences.SEQUENCE_KEYS)
    for k, v in seqs.items():
        assert v.shape == seqs["input_ids"].shape and v.shape[1] == T
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    seg, pos, mask = seqs["segment_ids"], seqs["positions"], seqs["loss_mask"]
    assert np.all(mask[seg == 0] == 0)                 # padding never supervised
    for r in range(seg.shape[0]):
        s = seg[r]
        real = s > 0
        n = real.sum()
        assert np.all(real[:n]) and not np.any(real[n:])  # padding only at the end
        assert np.all(np.diff(s[:n]) >= 0) and (n == 0 or s[0] == 1)
        starts = np.r_[True, s[1:n] != s[:n - 1]]
        # positions restart at every document start and count up by one inside it
        assert np.all(pos[r, :n][starts] == 0)
        assert np.all(pos[r, 1:n][~starts[1:]] == pos[r, :n - 1][~starts[1:]] + 1)


def test_unpacked_rows_shift_by_one_and_pad_by_position():
    T = 6
    examples = [_ex([5, 6, 7, 8]), _ex([9, 0, 3], [0, 0, 1])]
    seqs = sequences.build_sequences(examples, T, packing=False, pad_id=0)
    check_invariants(seqs, T)
    np.testing.assert_array_equal(seqs["input_ids"], [[5, 6, 7, 0, 0, 0], [9, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["target_ids"], [[6, 7, 8, 0, 0, 0], [0, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["loss_mask"], [[1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["segment_ids"], [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["positions"], [[0, 1, 2, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    # Token 0 is a real target in row 1 and also the pad id: only segment/loss_mask tell them apart.
    assert seqs["target_ids"][1, 0] == 0 and seqs["segment_ids"][1, 0] == 1


def test_packing_is_greedy_sequential_with_segments_and_positions():
    T = 8
    lengths = [4, 5, 3, 9, 2, 6]          # pairs: 3, 4, 2, 8, 1, 5
    rng = np.random.default_rng(0)
    examples = [_ex(rng.integers(3, 100, n)) for n in lengths]
    seqs = sequences.build_sequences(examples, T, packing=True)
    check_invariants(seqs, T)
    # rows: [3+4], [2], [8], [1+5]  (the 2-pair example does not fit after 7, nothing jumps the queue)
    np.testing.assert_array_equal(seqs["segment_ids"], [
            [1, 1, 1, 2, 2, 2, 2, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 2, 2, 2, 2, 2, 0, 0]])
    # Every example appears whole and in order; targets never cross a document boundary.
    docs = []
    for r in range(seqs["input_ids"].shape[0]):
        for s in range(1, seqs["segment_ids"][r].max() + 1):
            sel = seqs["segment_ids"][r] == s
            docs.append((seqs["input_ids"][r, sel], seqs["target_ids"][r, sel], seqs["loss_mask"][r, sel]))
    assert len(docs) == len(examples)
    for ex, (inp, tgt, mask) in zip(examples, docs):
        ids = np.asarray(ex["input_ids"])
        np.testing.assert_array_equal(inp, ids[:-1])
        np.testing.assert_array_equal(tgt, ids[1:])
        np.testing.assert_array_equal(mask, np.asarray(ex["loss_mask"][1:], np.float32))


def test_long_examples_are_truncated_and_counted():
    T = 4
    examples = [_ex(range(3, 10)), _ex(range(3, 8)), _ex(range(3, 5))]  # 7, 5 (= T + 1: fits), 2 tokens
    assert sequences.num_truncated(examples, T) == 1
    for packing in (False, True):
        seqs = sequences.build_sequences(examples, T, packing=packing)
        check_invariants(seqs, T)
        np.testing.assert_array_equal(seqs["input_ids"][0], [3, 4, 5, 6])
        np.testing.assert_array_equal(seqs["target_ids"][0], [4, 5, 6, 7])
        assert seqs["input_ids"].shape[0] == 3  # truncation never spills into another row


def test_examples_without_targets_are_skipped_and_empty_input_gives_zero_rows():
    seqs = sequences.build_sequences([_ex([7])], 4, packing=True)
    assert seqs["input_ids"].shape == (0, 4) and sequences.count_supervised_tokens(seqs) == 0


def test_mismatched_mask_is_rejected():
    with pytest.raises(ValueError, match="example 0"):
        sequences.build_sequences([{"input_ids": [1, 2, 3], "loss_mask": [0, 1]}], 4, packing=False)


def test_count_supervised_tokens_equals_masks_after_shift():
    examples = [_ex([1, 5, 6, 2], [0, 0, 1, 1]), _ex([1, 7, 2])]
    for packing in (False, True):
        seqs = sequences.build_sequences(examples, 8, packing)
        assert sequences.count_supervised_tokens(seqs) == 2 + 2


def test_chunk_text_makes_every_token_after_the_first_a_target_once():
    stream = list(range(3, 3 + 23))
    T = 5
    chunks = sequences.chunk_text(stream, T)
    assert len(chunks) == 5 and all(len(c["input_ids"]) == T + 1 for c in chunks[:-1])
    seqs = sequences.build_sequences(chunks, T, packing=False)
    check_invariants(seqs, T)
    targets = seqs["target_ids"][seqs["loss_mask"] > 0]
    np.testing.assert_array_equal(targets, stream[1:])
    assert sequences.chunk_text(stream[:1], T) == [] and sequences.chunk_text(stream[:6], T) == [_ex(stream[:6])]


@pytest.mark.parametrize("size, n_val", [(0, 0), (0.05, 5), (0.101, 11), (7, 7), (7.0, 7)])
def test_split_sizes(size, n_val):
    train, val = sequences.split_train_val(list(range(100)), size, seed=0)
    assert len(val) == n_val and len(train) == 100 - n_val
    assert sorted(train + val) == list(range(100))


def test_split_is_deterministic_and_seeded():
    items = list(range(50))
    a = sequences.split_train_val(items, 0.2, seed=3)
    assert a == sequences.split_train_val(items, 0.2, seed=3)
    assert a != sequences.split_train_val(items, 0.2, seed=4)


@pytest.mark.parametrize("size", [-1, 2.5, 10, 10.0])
def test_bad_split_sizes(size):
    with pytest.raises(ValueError, match="val_set_size"):
        sequences.split_train_val(list(range(10)), size, seed=0)


def test_val_set_size_errors_name_the_config_key():
    for size in (-1, 2.5, 10):
        with pytest.raises(ValueError, match=r"data\.val_set_size"):
            sequences.split_train_val(list(range(10)), size, seed=0)


def test_packed_logits_and_loss_equal_each_document_alone(tmp_path):
    import jax.numpy as jnp
    import optax
    import torch

    from easytune.models import hf_weights, llama
    torch_model = save_tiny_hf_llama(tmp_path / "m", vocab=96)
    cfg, params = hf_weights.load_hf_model(tmp_path / "m")
    rng = np.random.default_rng(0)
    docs = []
    for n in (7, 12, 5):
        ids = rng.integers(3, 96, n).tolist()
        p = int(rng.integers(1, n - 1))
        docs.append(_ex(ids, [0] * p + [1] * (n - p)))
    T = 24
    packed = sequences.build_sequences(docs, T, packing=True)
    assert packed["input_ids"].shape == (1, T) and packed["segment_ids"].max() == 3
    unpacked = sequences.build_sequences(docs, T, packing=False)
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
    assert sequences.apply_excess_length(exs, 8, "truncate") == (exs, 0)
    assert sequences.apply_excess_length(exs, 8, "drop") == ([exs[0]], 1)
    with pytest.raises(ValueError, match=r"a:2: example has 17 tokens, more than data\.sequence_len \+ 1 = 9"):
        sequences.apply_excess_length(exs, 8, "raise")
    with pytest.raises(ValueError, match="excess_length_strategy"):
        sequences.apply_excess_length(exs, 8, "cut")


def test_examples_whose_supervision_is_truncated_away_are_dropped():
    exs = [dict(_ex(range(3, 15), [0] * 10 + [1, 1]), _source="a:1"), dict(_ex(range(3, 8), [0, 0, 1, 1, 1]),
                                                                           _source="a:2")]
    kept, dropped = sequences.drop_unsupervised(exs, 8)
    assert kept == [exs[1]] and dropped == ["a:1"]


def test_length_histogram_bins_cover_every_example_once():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 300, 200).tolist()
    hist = sequences.length_histogram(lengths, bins=8)
    assert len(hist) <= 8 and sum(c for _, _, c in hist) == 200
    for lo, hi, c in hist:  # reference: a plain count per inclusive bin
        assert c == sum(lo <= n <= hi for n in lengths)
    assert hist[0][0] == min(lengths) and hist[-1][1] >= max(lengths)
