"""The untrained-token pre-flight check (easytune.train.untrained): a tiny transformers Llama whose EOS rows of
``embed_tokens`` and ``lm_head`` are zeroed, trained on the quickstart data (every example ends in a supervised
EOS). References are computed here with plain numpy from the saved torch weights and the dense ``[N, T]`` rows."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from easytune import config as config_lib
from easytune.train import loop
from tests.helpers import save_tiny_hf_llama, tiny_run_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _zeroed_base(root: pathlib.Path, *, tied: bool) -> dict:
    """Quickstart data + tokenizer and a tiny Llama with 4 spare vocab rows; the EOS rows and the spare row
    ``V - 1`` (a token the data never uses) zeroed. Returns the paths, ids and the original float32 matrices."""
    from transformers import AutoTokenizer

    from easytune.data import quickstart
    assets = quickstart.build_quickstart(root / "assets", num_records=120)
    tok = AutoTokenizer.from_pretrained(str(assets["tokenizer_dir"]))
    vocab = len(tok) + 4
    model = save_tiny_hf_llama(root / "model", vocab=vocab, tied=tied)
    eos, unused = tok.eos_token_id, vocab - 1
    with torch.no_grad():
        for w in [model.model.embed_tokens.weight] + ([] if tied else [model.lm_head.weight]):
            w[eos] = 0.0
            w[unused] = 0.0
    model.save_pretrained(root / "model")
    embed = model.model.embed_tokens.weight.detach().float().numpy().copy()
    head = None if tied else model.lm_head.weight.detach().float().numpy().copy()  # HF [V, D]
    return {"model": root / "model", "tokenizer": assets["tokenizer_dir"], "train": assets["train_file"],
            "eos": eos, "unused": unused, "embed": embed, "head": head, "vocab": vocab}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _zeroed_base(tmp_path_factory.mktemp("untrained"), tied=False)


def _config(base, out, **overrides):
    c = tiny_run_config(out, **{"model.preset": "", "data.builtin": "", "train.max_steps": 8,
                                "train.sample_max_new_tokens": 0, "optim.warmup_steps": 0,
                                "optim.learning_rate": 3e-3, **overrides})
    c.model.path = str(base["model"])
    c.tokenizer.path = str(base["tokenizer"])
    c.data.train_files = [str(base["train"])]
    return c


def _set_up(config, lines):
    return loop.set_up(config, False, lines.append, None, dry_run=True)


def _dense_counts(seqs, vocab):
    """Reference counts from the whole dense [N, T] rows (the PackedSequences column view)."""
    real = seqs["segment_ids"] > 0
    sup = real & (seqs["loss_mask"] > 0)
    return {"input": np.bincount(seqs["input_ids"][real], minlength=vocab),
            "target": np.bincount(seqs["target_ids"][real], minlength=vocab),
            "supervised": np.bincount(seqs["target_ids"][sup], minlength=vocab)}


def test_token_usage_streams_to_the_dense_counts(base, tmp_path):
    from easytune.data import packed
    from easytune.data.prepare import prepare_dataset
    from easytune.tokenizer import load_tokenizer
    from easytune.train import untrained
    c = _config(base, tmp_path / "run", **{"data.packing": True})
    train, val, _ = prepare_dataset(c.data, load_tokenizer(str(base["tokenizer"])))
    assert isinstance(train, packed.PackedSequences)
    for seqs in (train, val):
        ref = _dense_counts(seqs, base["vocab"])
        for chunk in (7, 1 << 20):  # chunks that cut examples, and one chunk
            got = untrained.token_usage(seqs, base["vocab"], chunk=chunk)
            for k in ref:
                np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        arrays = packed.ArraySequences({k: seqs[k] for k in seqs.keys()})  # the in-memory row path
        got = untrained.token_usage(arrays, base["vocab"], chunk=3 * c.data.sequence_len)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert ref["supervised"][base["eos"]] > 0 and ref["input"][base["unused"]] == 0


def test_dry_run_warns_naming_the_eos_token(base, tmp_path):
    lines = []
    out = loop.train(_config(base, tmp_path / "run"), dry_run=True, log=lines.append)
    text = "\n".join(lines)
    eos = base["eos"]
    assert f"id {eos} '</s>' (embed_tokens and lm_head row zero)" in text
    assert "is the EOS token and a supervised target" in text and "fix_untrained_tokens=True" in text
    found = out["untrained_tokens"]
    assert [t["id"] for t in found["tokens"]] == [eos]  # the unused zero row is not reported
    assert found["untrained_rows"] == {"embed_tokens": 2, "lm_head": 2} and found["fixed"] == {}
    run = _set_up(_config(base, tmp_path / "run2"), [])
    for split, seqs in (("train", run.train_seqs), ("val", run.val_seqs)):
        ref = _dense_counts(seqs, base["vocab"])
        assert found["tokens"][0][split] == {k: int(ref[k][eos]) for k in ref}


def test_fix_sets_the_mean_of_the_trained_rows_on_a_mesh(base, tmp_path):
    """Full fine-tuning, fsdp over the 8 simulated devices: the EOS rows become the numpy mean of the other
    (nonzero) rows of the original matrices; the unused zero row and every other row are untouched."""
    lines = []
    run = _set_up(_config(base, tmp_path / "run", **{"model.fix_untrained_tokens": True}), lines)
    assert run.setup.mesh.size == 8
    emb_arr = run.setup.trainable["params"]["model"]["embed_tokens"]["embedding"]
    assert len(emb_arr.sharding.device_set) == 8
    emb = np.asarray(emb_arr)
    head = np.asarray(run.setup.trainable["params"]["lm_head"]["kernel"]).T  # HF [V, D]
    eos, unused = base["eos"], base["unused"]
    for got, ref in ((emb, base["embed"]), (head, base["head"])):
        trained = np.ones(len(ref), bool)
        trained[[eos, unused]] = False
        np.testing.assert_allclose(got[eos], ref[trained].mean(axis=0), rtol=1e-6, atol=1e-7)
        assert not got[unused].any()
        np.testing.assert_array_equal(np.delete(got, eos, axis=0), np.delete(ref, eos, axis=0))
    assert any(f"set 1 embed_tokens row(s) [{eos} '</s>']" in line for line in lines)
    assert any(f"set 1 lm_head row(s) [{eos} '</s>']" in line for line in lines)
    # the train state the optimizer starts from holds the fixed rows
    np.testing.assert_array_equal(np.asarray(run.state.trainable["params"]["model"]["embed_tokens"]["embedding"]),
                                  emb)


def _eos_logits(setup, trainable, seqs):
    """``(EOS logits at every real position [M], -log p(EOS) at the supervised EOS targets [K])``: float64,
    plain numpy log-softmax of the model's logits."""
    from easytune import lora as lora_lib
    b = seqs.gather(np.arange(len(seqs)))
    logits = np.asarray(setup.model.apply(lora_lib.combine(trainable, setup.frozen), b["input_ids"],
                                          positions=b["positions"], segment_ids=b["segment_ids"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    eos = setup.tokenizer.eos_token_id
    where = (b["target_ids"] == eos) & (b["loss_mask"] > 0)
    assert where.sum() > 0
    return logits[..., eos][b["segment_ids"] > 0], -logp[..., eos][where]


@pytest.mark.slow
def test_training_with_the_fix_learns_to_predict_eos(base, tmp_path):
    """With the fix the EOS logit depends on the input from step 0 and training lowers the EOS loss; the case
    the warning describes, LoRA with the head frozen and no fix, keeps the EOS logit at exactly 0."""
    from easytune.train import setup as setup_lib
    start = _set_up(_config(base, tmp_path / "start", **{"model.fix_untrained_tokens": True}), [])
    logit0, nll0 = _eos_logits(start.setup, start.setup.trainable, start.val_seqs)
    assert logit0.std() > 1e-3  # no longer a constant 0
    loop.train(_config(base, tmp_path / "run", **{"model.fix_untrained_tokens": True, "train.max_steps": 12}),
               log=lambda *a: None)
    setup, trainable = setup_lib.load_run(tmp_path / "run")
    _, nll = _eos_logits(setup, trainable, start.val_seqs)
    assert nll.mean() < nll0.mean() - 0.5, (nll0.mean(), nll.mean())
    assert np.abs(np.asarray(trainable["params"]["lm_head"]["kernel"])[:, base["eos"]]).max() > 0

    loop.train(_config(base, tmp_path / "lora", **{"method": "lora", "train.max_steps": 12}), log=lambda *a: None)
    setup, trainable = setup_lib.load_run(tmp_path / "lora")
    logit, _ = _eos_logits(setup, trainable, start.val_seqs)
    assert not logit.any()  # frozen zero head row: logit 0 whatever the input


def test_lora_with_frozen_rows_refuses_the_fix_and_modules_to_save_fixes_them(base, tmp_path):
    c = _config(base, tmp_path / "a", **{"method": "lora", "model.fix_untrained_tokens": True})
    with pytest.raises(config_lib.ConfigError, match=r"'embed_tokens', 'lm_head'.*lora\.modules_to_save"):
        _set_up(c, [])
    lines = []  # without the fix: a warning that says what to add
    _set_up(_config(base, tmp_path / "b", **{"method": "lora"}), lines)
    assert any("also add 'embed_tokens', 'lm_head' to lora.modules_to_save" in line for line in lines)
    # modules_to_save + scanned layers: the trainable copies are fixed, the frozen tree has no embedding
    c = _config(base, tmp_path / "c", **{"method": "lora", "model.fix_untrained_tokens": True,
                                         "model.scan_layers": True})
    c.lora.modules_to_save = ["embed_tokens", "lm_head"]
    run = _set_up(c, [])
    assert "embed_tokens" not in run.setup.frozen["params"]["model"]
    emb = np.asarray(run.setup.trainable["params"]["model"]["embed_tokens"]["embedding"])
    trained = np.ones(base["vocab"], bool)
    trained[[base["eos"], base["unused"]]] = False
    np.testing.assert_allclose(emb[base["eos"]], base["embed"][trained].mean(axis=0), rtol=1e-6, atol=1e-7)


def test_qlora_nf4_head_is_detected_and_the_fix_refused(base, tmp_path):
    """QLoRA with lm_head quantized (llm_int8_skip_modules=[]): the zero column survives NF4 and is found."""
    lines = []
    c = _config(base, tmp_path / "a", **{"method": "qlora"})
    c.qlora.llm_int8_skip_modules = []
    run = _set_up(c, lines)
    from easytune import quant
    assert quant.is_qtensor(run.setup.frozen["params"]["lm_head"]["kernel"])
    assert run.untrained["untrained_rows"]["lm_head"] == 2
    c.model.fix_untrained_tokens = True
    c.train.output_dir = str(tmp_path / "b")
    with pytest.raises(config_lib.ConfigError, match=r"'lm_head'.*qlora run keeps frozen"):
        _set_up(c, [])


def test_tied_model_checks_and_fixes_the_embedding(tmp_path):
    tied = _zeroed_base(tmp_path / "base", tied=True)
    lines = []
    run = _set_up(_config(tied, tmp_path / "run", **{"model.fix_untrained_tokens": True}), lines)
    assert run.setup.model_cfg.tie_word_embeddings and "lm_head" not in run.setup.trainable["params"]
    assert run.untrained["untrained_rows"] == {"embed_tokens": 2}
    assert run.untrained["tokens"][0]["modules"] == ["embed_tokens"]
    emb = np.asarray(run.setup.trainable["params"]["model"]["embed_tokens"]["embedding"])
    trained = np.ones(tied["vocab"], bool)
    trained[[tied["eos"], tied["unused"]]] = False
    np.testing.assert_allclose(emb[tied["eos"]], tied["embed"][trained].mean(axis=0), rtol=1e-6, atol=1e-7)
    assert not emb[tied["unused"]].any()
    # a tied head's output row is the embedding row: the EOS note applies
    assert any(f"id {tied['eos']} is the EOS token" in line and "(tied) output row" in line for line in lines), lines


def test_a_model_without_zero_rows_says_so_in_one_line(tmp_path):
    lines = []
    c = tiny_run_config(tmp_path / "run", **{"train.max_steps": 2})  # the quickstart preset: random rows
    run = _set_up(c, lines)
    assert run.untrained is None and not any("warning" in line for line in lines)
    assert "untrained tokens: none (embed_tokens and lm_head rows all have max |w| > 1e-16)" in lines
    assert json.dumps(run.untrained) == "null"
