"""Train a byte-level BPE or unigram tokenizer for pretraining, streaming the corpus from disk.

``easytune tokenizer train --files 'corpus/*.txt' --vocab-size 4096 --out models/my-tok`` reads the corpus
lazily (:func:`iter_corpus`: batches of lines from ``.txt`` files, the ``text`` field of ``.jsonl``
records), trains with ``tokenizers.Tokenizer.train_from_iterator`` and saves a directory that
``transformers.AutoTokenizer.from_pretrained`` loads (``tokenizer.json`` + ``tokenizer_config.json``).

The tokenizer (both models):

* byte level: text is mapped to GPT-2's 256-symbol byte alphabet (``pre_tokenizers.ByteLevel``), every
  symbol is in the vocabulary, so any UTF-8 text encodes without ``<unk>`` and decodes back byte for byte;
* pre-tokenization: GPT-2's regex split (words with their leading space, punctuation runs, whitespace
  runs), and by default each digit a token of its own (``Digits(individual_digits=True)``, as Llama 1/2);
* special tokens: ``<unk>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos) = 2, ``<pad>`` = 3 (Llama's ids for the
  first three), then any extra ones (e.g. ChatML's ``<|im_start|>``, ``<|im_end|>``) in the order given;
* encoding adds bos in front, as Llama's tokenizer does (``add_special_tokens=True``);
* an optional chat template (Jinja, ``tokenizer_config.json["chat_template"]``) for
  ``apply_chat_template``; ``"chatml"`` is built in and adds its two special tokens.

``model="bpe"`` is byte-pair encoding (Sennrich et al. 2016, GPT-2's byte-level variant);
``model="unigram"`` is the unigram language model (Kudo 2018) trained by EM with pruning, as SentencePiece,
here over the same byte alphabet.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np

MODELS = ("bpe", "unigram")
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
BYTE_ALPHABET_SIZE = 256
CHUNK_CHARS = 1 << 20  # characters per batch handed to the trainer (about 1 MB of text)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # .json: JSON Lines only (an array cannot be streamed)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATES = {
        # ChatML (OpenAI; Qwen2's and many small models' template); the assistant turn is left open when
        # add_generation_prompt is set.
        "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


def expand_files(patterns: Sequence[str], flag: str = "--files") -> list[str]:
    """Paths, globs (``**`` recursive) and directories (every file below, sorted) -> sorted unique file paths.

    Raises:
        ValueError: no pattern given, or a pattern matches no file (the message names ``flag`` and it).
    """
    if not patterns:
        raise ValueError(f"{flag}: no training files given")
    out: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.exists(pattern) else [])
        files = []
        for m in matches:
            if os.path.isdir(m):
                files += sorted(str(p) for p in pathlib.Path(m).rglob("*") if p.is_file())
            elif os.path.isfile(m):
                files.append(m)
        if not files:
            raise ValueError(f"{flag}: no file matches {pattern!r}")
        out += [f for f in files if f not in out]
    return out


def iter_corpus(files: Sequence[str], text_field: str = "text",
                chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Streams the corpus as batches of texts, never holding a whole file in memory.

    ``.jsonl`` / ``.ndjson`` / ``.json`` (JSON Lines): one text per record, the string at ``text_field``
    (records whose field is an empty string are skipped). Any other file is read as UTF-8 text, one text
    per line with its ``\\n`` kept (what ``tokenizers.Tokenizer.train(files)`` does); a line longer than
    ``chunk_chars`` is cut into pieces of ``chunk_chars`` characters. Texts are grouped into batches of
    about ``chunk_chars`` characters, the unit ``Tokenizer.train_from_iterator`` consumes.

    Args:
        files: file paths (see :func:`expand_files` for globs).
        text_field: jsonl field holding the text.
        chunk_chars: batch size and longest piece, in characters (>= 1).

    Yields:
        ``list[str]``, each list about ``chunk_chars`` characters in total.

    Raises:
        ValueError: ``path:line`` of an invalid JSON line, a JSON array file, a record that is not an object,
            or a record whose ``text_field`` is missing or not a string; a file that is not UTF-8 (with the
            byte offset).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    batch: list[str] = []
    size = 0
    for path in files:
        for text in (_jsonl_texts(path, text_field) if path.lower().endswith(JSONL_SUFFIXES)
                     else _text_lines(path, chunk_chars)):
            batch.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _text_lines(path: str, chunk_chars: int) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            yield from iter(lambda: f.readline(chunk_chars), "")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def _jsonl_texts(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if lineno == 1 and line.lstrip().startswith("["):
                raise ValueError(f"{path}:1: a JSON array; the tokenizer trainer streams JSON Lines (one object "
                                 f"per line): convert it, e.g. with jq -c '.[]'")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (--text-field); the record has "
                                 f"{sorted(record)}")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} must be a string, got "
                                 f"{type(text).__name__}")
            if text:
                yield text


def resolve_chat_template(spec: str | None) -> tuple[str | None, tuple[str, ...]]:
    """``--chat-template``: ``None``/``""`` (none), ``"chatml"`` (built in), a ``.jinja`` file, or a Jinja string.

    Returns:
        ``(template or None, special tokens the template needs)``.

    Raises:
        ValueError: a name that is neither a built-in, a file, nor a Jinja string.
    """
    if not spec:
        return None, ()
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec], CHATML_TOKENS if spec == "chatml" else ()
    if "{{" in spec or "{%" in spec:
        return spec, ()
    if os.path.isfile(spec):
        return pathlib.Path(spec).read_text(encoding="utf-8"), ()
    raise ValueError(f"--chat-template: {spec!r} is not a file, a Jinja string, or a built-in "
                     f"({', '.join(CHAT_TEMPLATES)})")


MAX_VOCAB = 1_048_576  # ids above 2**20: far past any LLM vocabulary (Gemma's 256k is the largest common one)


def train_tokenizer(files: Sequence[str], vocab_size: int, model: str = "bpe", *, text_field: str = "text",
                    min_frequency: int = 2, split_digits: bool = True, extra_special_tokens: Sequence[str] = (),
                    chunk_chars: int = CHUNK_CHARS, show_progress: bool = False):
    """Trains a byte-level BPE or unigram ``tokenizers.Tokenizer`` on files, streamed (:func:`iter_corpus`).

    Args:
        files: paths, globs or directories (``.txt``-like or ``.jsonl``).
        vocab_size: target vocabulary size in tokens, special tokens included. BPE stops earlier when no
            pair occurs ``min_frequency`` times; unigram prunes down to it.
        model: ``"bpe"`` or ``"unigram"``.
        text_field: jsonl field holding the text.
        min_frequency: BPE: least count of a pair to be merged.
        split_digits: each digit its own pre-token (Llama 1/2); False keeps GPT-2's digit runs.
        extra_special_tokens: added after ``<unk> <s> </s> <pad>`` (ids 4, 5, ...).
        chunk_chars: characters per batch read (memory bound of the reader).
        show_progress: the ``tokenizers`` progress bar on stderr.

    Returns:
        ``tokenizers.Tokenizer`` with ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, a ``<s>``-adding
        post-processor and a ByteLevel decoder.

    Raises:
        ValueError: unknown ``model`` (names ``--model``); ``vocab_size`` not above 256 + special tokens
            (names ``--vocab-size``); a file pattern matching nothing; a corpus with no text (names the files);
            bad records (see :func:`iter_corpus`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if model not in MODELS:
        raise ValueError(f"--model: unknown tokenizer model {model!r}; choose one of {', '.join(MODELS)}")
    if any(not t or not t.strip() for t in extra_special_tokens):
        raise ValueError("--special-token: an empty special token cannot be matched in text; give its text")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"--vocab-size: {vocab_size} is beyond {MAX_VOCAB:,} (the largest LLM vocabularies are "
                         f"~256k); the trainer would try to allocate memory for that many merges")
    specials = [UNK, BOS, EOS, PAD] + [t for t in extra_special_tokens if t not in (UNK, BOS, EOS, PAD)]
    specials = list(dict.fromkeys(specials))
    least = BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size <= least:
        raise ValueError(f"--vocab-size: {vocab_size} leaves no room to learn tokens; the byte alphabet "
                         f"({BYTE_ALPHABET_SIZE}) and {len(specials)} special tokens already take {least}; "
                         f"use more than {least}")
    paths = expand_files(files)
    batches = iter_corpus(paths, text_field, chunk_chars)
    first = next((b for b in batches if any(b)), None)
    if first is None:
        raise ValueError(f"--files: the corpus holds no text ({', '.join(paths[:3])}"
                         f"{', ...' if len(paths) > 3 else ''})")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=alphabet, show_progress=show_progress)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=UNK,
                                          initial_alphabet=alphabet, show_progress=show_progress)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(itertools.chain([first], batches), trainer)
    for i, t in enumerate(specials):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"tokenizers placed special token {t!r} at id {tok.token_to_id(t)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 1)])
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike, chat_template: str | None = None,
                   model_max_length: int = 2048) -> pathlib.Path:
    """Saves ``tok`` as a ``PreTrainedTokenizerFast`` dir that ``AutoTokenizer.from_pretrained`` loads offline.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (bos/eos/unk/pad names, ``chat_template``,
    ``model_max_length`` in tokens, ``tokenizer_class="PreTrainedTokenizerFast"``, which transformers 4
    and 5 both resolve) and ``special_tokens_map.json`` where transformers writes one.

    Returns:
        The directory.
    """
    from transformers import PreTrainedTokenizerFast

    out = pathlib.Path(out_dir)
    extra = [t.content for i, t in sorted(tok.get_added_tokens_decoder().items()) if i >= 4 and t.special]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
                                 model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    if extra:
        hf.add_special_tokens({"additional_special_tokens": extra})
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(os.fspath(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def bytes_per_token(tokenizer, texts: Iterable[str]) -> dict:
    """Compression of ``tokenizer`` on ``texts``: UTF-8 bytes per token (higher = fewer tokens per text).

    Tokens are counted without special tokens (``add_special_tokens=False``), so the figure compares
    across tokenizers; the bits-per-byte of a model is ``loss_nats_per_token / ln(2) / bytes_per_token``.

    Args:
        tokenizer: a ``transformers`` tokenizer (or anything with ``encode(text, add_special_tokens=False)``).
        texts: the evaluation texts (e.g. :func:`iter_corpus` batches flattened).

    Returns:
        ``dict(bytes=int, tokens=int, bytes_per_token=float)``.

    Raises:
        ValueError: the texts hold no bytes.
    """
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text, add_special_tokens=False))
    if not n_bytes:
        raise ValueError("no text to measure compression on")
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}


def evaluate_files(tokenizer_dir: str | os.PathLike, patterns: Sequence[str], text_field: str = "text") -> dict:
    """``easytune tokenizer eval``: :func:`bytes_per_token` of the tokenizer in ``tokenizer_dir`` over the corpus
    files ``patterns`` (globs; ``.txt`` lines, the ``text_field`` of ``.jsonl`` records, read lazily).

    Returns:
        ``dict(bytes=int, tokens=int, bytes_per_token=float)``.

    Raises:
        ValueError: no tokenizer loads from ``tokenizer_dir`` (named), the files hold no text;
        FileNotFoundError: a pattern matches no file.
    """
    tok = load_tokenizer(tokenizer_dir)
    files = expand_files(patterns)
    return bytes_per_token(tok, (text for batch in iter_corpus(files, text_field) for text in batch))


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (``bytes_to_unicode`` in openai/gpt-2 ``encoder.py``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for: the denominator of bits per byte.

    ``bits/byte = sum(nll of target tokens, nats) / ln 2 / sum(lengths[target ids])``, a loss that compares
    across tokenizers (The Pile paper, Gao et al. 2020, section 4; llm.c / nanoGPT report it likewise).
    Byte-level tokenizers (a ``ByteLevel`` decoder, as ours and GPT-2's) map each symbol back to its byte;
    SentencePiece-style ones (Llama 1/2) count ``<0xHH>`` byte-fallback pieces as 1 byte and ``▁`` as a
    space. Special tokens (bos, eos, pad, unk, chat markers) are 0 bytes: they are not text.

    Args:
        tokenizer: a ``transformers`` fast tokenizer.

    Returns:
        ``int32`` array of shape ``[len(tokenizer)]``, bytes per token id.
    """
    import re

    byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    decoder = _gpt2_byte_decoder()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    lengths = np.zeros(len(tokenizer), np.int32)
    for piece, i in tokenizer.get_vocab().items():
        if i in special or i >= len(lengths):
            continue
        if byte_level:
            lengths[i] = sum(1 if c in decoder else len(c.encode("utf-8")) for c in piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            lengths[i] = 1
        else:
            lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return lengths


def train_and_save(files: Sequence[str], out_dir: str | os.PathLike, vocab_size: int, model: str = "bpe", *,
                   text_field: str = "text", chat_template: str | None = None, min_frequency: int = 2,
                   split_digits: bool = True, extra_special_tokens: Sequence[str] = (),
                   model_max_length: int = 2048, show_progress: bool = False) -> dict:
    """``easytune tokenizer train``: :func:`train_tokenizer` then :func:`save_tokenizer`.

    Returns:
        ``dict(out_dir=str, vocab_size=int, special_tokens={name: id})``.

    Raises:
        ValueError: as :func:`train_tokenizer` and :func:`resolve_chat_template`.
    """
    template, template_tokens = resolve_chat_template(chat_template)
    extra = list(dict.fromkeys(list(extra_special_tokens) + list(template_tokens)))
    tok = train_tokenizer(files, vocab_size, model, text_field=text_field, min_frequency=min_frequency,
                          split_digits=split_digits, extra_special_tokens=extra, show_progress=show_progress)
    out = save_tokenizer(tok, out_dir, template, model_max_length)
    specials = {t: tok.token_to_id(t) for t in [UNK, BOS, EOS, PAD] + extra}
    return {"out_dir": str(out), "vocab_size": tok.get_vocab_size(), "special_tokens": specials}


def load_tokenizer(path: str | pathlib.Path):
    """``transformers.AutoTokenizer`` from a local dir (never the hub).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ValueError: transformers cannot load a tokenizer from it (its error, first line, with the dir named).
    """
    from transformers import AutoTokenizer
    if not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer dir not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/JSON errors with no path in them
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{path}: cannot load a Hugging Face tokenizer from it ({type(e).__name__}: {first})") from e
