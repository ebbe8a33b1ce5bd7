"""Tokenizer loading, encode/decode, and the streaming IncrementalDetokenizer."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from model.detokenizer import IncrementalDetokenizer
from model.tokenizer import (
    GPT2_ASSETS_DIR,
    GPT2_MERGES_SHA256,
    GPT2_VOCAB_SHA256,
    Tokenizer,
    TokenizerError,
)

BUNDLED_VOCAB = GPT2_ASSETS_DIR / "encoder.json"
BUNDLED_MERGES = GPT2_ASSETS_DIR / "vocab.bpe"

TEXTS = [
    "Hello world",
    "",
    " ",
    "\n",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    inner   spaces",
    "line one\nline two\n\n\nline five\r\n",
    "\ttabs\tand\t\tmore\t",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "punctuation!?.,;:'\"()[]{}<>@#$%^&*-_=+/\\|`~",
    "don't you'll we've they're I'm he'd",
    "emoji 🤖🦄👍🏽 a family 👨‍👩‍👧‍👦 and a rainbow flag 🏳️‍🌈",
    "flags 🇯🇵🇫🇷🇺🇸",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "accented: café naïve résumé Ångström façade",
    "mixed: Grüße 🌍 世界 123 <tag> \u00a0nbsp\u2003emspace\u200bzero-width",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def reference() -> Any:
    """Hugging Face's GPT-2 tokenizer built from the same files: an independent implementation."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Tokenizer(vocab=str(BUNDLED_VOCAB), merges=str(BUNDLED_MERGES))


def _byte_token(tokenizer: Tokenizer, byte: int) -> int:
    return next(i for i in range(256) if tokenizer.token_bytes(i) == bytes([byte]))


def _write_model_dir(folder: Path, vocab: dict[str, int], merges_lines: list[str]) -> Path:
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(merges_lines) + "\n", encoding="utf-8")
    return folder


def _bundled_vocab() -> dict[str, int]:
    return json.loads(BUNDLED_VOCAB.read_text(encoding="utf-8"))


def _bundled_merges_lines() -> list[str]:
    return BUNDLED_MERGES.read_text(encoding="utf-8").rstrip("\n").split("\n")


def test_encode_hello_world(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_encode_matches_transformers(tokenizer: Tokenizer, reference: Any) -> None:
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text


def test_encode_treats_endoftext_as_plain_text(tokenizer: Tokenizer, reference: Any) -> None:
    text = "before <|endoftext|> after<|endoftext|>"
    ids = tokenizer.encode(text)
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == text
    plain = reference(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == plain


def test_encode_prompt_reads_endoftext_as_the_special_token(
    tokenizer: Tokenizer, reference: Any
) -> None:
    text = "before <|endoftext|> after<|endoftext|>"
    ids = tokenizer.encode_prompt(text)
    assert ids.count(tokenizer.eos_token_id) == 2
    assert ids == reference.encode(text)  # as Hugging Face's tokenizer (and vLLM) read it
    assert tokenizer.encode_prompt(tokenizer.decode(ids)) == ids  # ids -> text -> same ids


def test_report_eos_and_vocab_size(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.vocab_size == 50257
    assert tokenizer.decode([tokenizer.eos_token_id]) == "<|endoftext|>"
    assert tokenizer.name == "gpt2"


def test_default_is_cached() -> None:
    assert Tokenizer.default() is Tokenizer.default()


def test_bundled_files_match_published_hashes() -> None:
    # The SHA-256s tiktoken pins for OpenAI's GPT-2 encoding (tiktoken_ext.openai_public's
    # encoder_json_hash and vocab_bpe_hash).
    published_vocab = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    published_merges = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    assert hashlib.sha256(BUNDLED_VOCAB.read_bytes()).hexdigest() == published_vocab
    assert hashlib.sha256(BUNDLED_MERGES.read_bytes()).hexdigest() == published_merges
    assert (published_vocab, published_merges) == (GPT2_VOCAB_SHA256, GPT2_MERGES_SHA256)


@pytest.mark.parametrize("altered", ["encoder.json", "vocab.bpe"])
def test_reject_hash_mismatch(tmp_path: Path, altered: str) -> None:
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(GPT2_ASSETS_DIR / name, tmp_path / name)
    data = bytearray((tmp_path / altered).read_bytes())
    # "...azed" -> "...azex" keeps the file well-formed, so only the hash check can catch it.
    position = data.rindex(b"azed")
    data[position + 3] = ord("x")
    (tmp_path / altered).write_bytes(bytes(data))
    expected = GPT2_VOCAB_SHA256 if altered == "encoder.json" else GPT2_MERGES_SHA256
    actual = hashlib.sha256(bytes(data)).hexdigest()

    with pytest.raises(TokenizerError, match="SHA-256 mismatch") as caught:
        Tokenizer.from_files(
            tmp_path / "encoder.json",
            tmp_path / "vocab.bpe",
            vocab_sha256=GPT2_VOCAB_SHA256,
            merges_sha256=GPT2_MERGES_SHA256,
        )
    message = str(caught.value)
    assert str(tmp_path / altered) in message
    assert expected in message and actual in message


def test_reject_missing_files(tmp_path: Path) -> None:
    missing = tmp_path / "vocab.json"
    with pytest.raises(TokenizerError, match="not found") as caught:
        Tokenizer.from_files(missing, BUNDLED_MERGES)
    assert str(missing) in str(caught.value)
    with pytest.raises(ValueError, match="merges.txt"):
        Tokenizer.from_files(BUNDLED_VOCAB, tmp_path / "merges.txt")


@pytest.mark.parametrize(
    ("vocab_text", "message"),
    [
        ("{not json", "not valid UTF-8 JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('{"a": "zero"}', "not an int"),
        ('{"a": 0, "b": 2}', "exactly 0..1"),
    ],
)
def test_reject_malformed_vocab(tmp_path: Path, vocab_text: str, message: str) -> None:
    vocab = tmp_path / "vocab.json"
    vocab.write_text(vocab_text, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message) as caught:
        Tokenizer.from_files(vocab, BUNDLED_MERGES)
    assert str(vocab) in str(caught.value)


def test_reject_malformed_merges(tmp_path: Path) -> None:
    lines = _bundled_merges_lines()
    lines.insert(3, "Ġ t h")
    folder = _write_model_dir(tmp_path / "model", _bundled_vocab(), lines)
    with pytest.raises(TokenizerError, match="line 4"):
        Tokenizer.for_model_dir(folder)


def test_reject_vocab_without_endoftext(tmp_path: Path) -> None:
    vocab = _bundled_vocab()
    del vocab["<|endoftext|>"]
    folder = _write_model_dir(tmp_path / "model", vocab, _bundled_merges_lines())
    with pytest.raises(TokenizerError, match="endoftext"):
        Tokenizer.for_model_dir(folder)


def test_reject_merge_ids_out_of_order(tmp_path: Path) -> None:
    # tiktoken would apply these two merges in the opposite order to the merges file.
    vocab = _bundled_vocab()
    vocab["Ġt"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġt"]
    folder = _write_model_dir(tmp_path / "model", vocab, _bundled_merges_lines())
    with pytest.raises(TokenizerError, match="increase"):
        Tokenizer.for_model_dir(folder)


def test_use_model_dir_vocab(tmp_path: Path, tokenizer: Tokenizer) -> None:
    vocab = _bundled_vocab()
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    folder = _write_model_dir(tmp_path / "my-model", vocab, _bundled_merges_lines())

    custom = Tokenizer.for_model_dir(folder)

    assert custom is not tokenizer and custom.name == "my-model"
    assert tokenizer.encode("!") == [0] and tokenizer.encode('"') == [1]
    assert custom.encode("!") == [1] and custom.encode('"') == [0]
    assert custom.decode([0, 1]) == '"!'
    assert custom.encode("Hello world") == [15496, 995]


def test_use_model_dir_with_fewer_merges(tmp_path: Path, tokenizer: Tokenizer) -> None:
    lines = _bundled_merges_lines()
    assert lines[-1] == "Ġg azed"
    vocab = _bundled_vocab()
    del vocab["Ġgazed"]
    vocab["<|endoftext|>"] = 50255
    folder = _write_model_dir(tmp_path / "small", vocab, lines[:-1])

    custom = Tokenizer.for_model_dir(folder)

    assert (custom.vocab_size, custom.eos_token_id) == (50256, 50255)
    assert len(tokenizer.encode(" gazed")) == 1
    assert len(custom.encode(" gazed")) == 2
    assert custom.decode(custom.encode(" gazed")) == " gazed"


def test_fall_back_to_default_without_files(tmp_path: Path) -> None:
    assert Tokenizer.for_model_dir(tmp_path) is Tokenizer.default()


def test_reject_model_dir_with_half_a_pair(tmp_path: Path) -> None:
    shutil.copy(BUNDLED_VOCAB, tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match="only one of"):
        Tokenizer.for_model_dir(tmp_path)


@pytest.mark.parametrize("bad_id", [-1, 50257, 10**9])
def test_reject_out_of_range_ids(tokenizer: Tokenizer, bad_id: int) -> None:
    with pytest.raises(ValueError, match=rf"token id {bad_id} .*0\.\.50256"):
        tokenizer.decode([15496, bad_id])
    with pytest.raises(ValueError, match=rf"token id {bad_id}"):
        tokenizer.decode_bytes([bad_id])
    with pytest.raises(ValueError, match=rf"token id {bad_id}"):
        tokenizer.token_bytes(bad_id)


def test_decode_replaces_invalid_utf8(tokenizer: Tokenizer) -> None:
    ids = [15496, _byte_token(tokenizer, 0x80), 995]
    assert tokenizer.decode_bytes(ids) == b"Hello\x80 world"
    assert tokenizer.decode(ids) == "Hello\ufffd world"


def _stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str, IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = []
    for token_id in ids:
        pieces.append(detokenizer.add(token_id))
        assert detokenizer.num_pending_bytes <= 3
    return pieces, detokenizer.flush(), detokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_stream_valid_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces, tail, detokenizer = _stream(tokenizer, ids)
    assert "".join(pieces) + tail == text
    assert tail == ""
    assert not any("\ufffd" in piece for piece in pieces)
    assert detokenizer.text == text
    assert detokenizer.num_tokens == len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_emits_each_character_when_complete(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    char_ends = [len(text[: i + 1].encode()) for i in range(len(text))]
    detokenizer = IncrementalDetokenizer(tokenizer)
    for count, token_id in enumerate(ids, start=1):
        detokenizer.add(token_id)
        num_bytes = len(tokenizer.decode_bytes(ids[:count]))
        num_complete_chars = sum(end <= num_bytes for end in char_ends)
        assert detokenizer.text == text[:num_complete_chars]


@pytest.mark.parametrize("char", ["🤖", "🦄", "語"])
def test_stream_holds_split_character(tokenizer: Tokenizer, char: str) -> None:
    ids = tokenizer.encode(char)
    assert len(ids) > 1  # the character really is split across byte-level tokens
    pieces, tail, _ = _stream(tokenizer, ids)
    assert pieces == [""] * (len(ids) - 1) + [char]
    assert tail == ""


def test_stream_never_holds_invalid_bytes(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add(_byte_token(tokenizer, 0x80)) == "\ufffd"  # lone continuation byte
    assert detokenizer.add(_byte_token(tokenizer, 0xF0)) == ""  # could still start an emoji
    assert detokenizer.add(_byte_token(tokenizer, ord("A"))) == "\ufffdA"
    assert detokenizer.add(_byte_token(tokenizer, 0xE4)) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.flush() == ""
    assert detokenizer.text == "\ufffd\ufffdA\ufffd"
    with pytest.raises(RuntimeError, match="after flush"):
        detokenizer.add(15496)


def test_stream_random_ids_matches_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    non_ascii = [i for i in range(tokenizer.vocab_size) if max(tokenizer.token_bytes(i)) >= 0x80]
    for _ in range(400):
        length = rng.randint(1, 16)
        pool = non_ascii if rng.random() < 0.7 else range(tokenizer.vocab_size)
        ids = [rng.choice(pool) for _ in range(length)]
        pieces, tail, detokenizer = _stream(tokenizer, ids)
        expected = tokenizer.decode(ids)
        assert "".join(pieces) + tail == expected
        assert detokenizer.text == expected
