"""Fixtures shared by the data tests: the real Llama 2 tokenizer, converted to a fast tokenizer once per session."""

import shutil

import pytest


@pytest.fixture(scope="session")
def llama2_tok_dir(shared_data, tmp_path_factory):
    """A tokenizer dir holding Llama 2's ``tokenizer.model`` and the ``tokenizer.json`` transformers converts it to
    (the conversion takes seconds; later loads read the JSON)."""
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("llama2_tok_fast")
    shutil.copy(shared_data / "tokenizers" / "llama2" / "tokenizer.model", d / "tokenizer.model")
    AutoTokenizer.from_pretrained(str(d), local_files_only=True).save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def llama2_tok(llama2_tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(llama2_tok_dir), local_files_only=True)
