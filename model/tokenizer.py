"""GPT-2 byte-level BPE tokenizer: loads vocab/merges files offline and wraps a tiktoken Encoding."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import tiktoken

GPT2_ASSETS_DIR = Path(__file__).parent / "assets" / "gpt2-bpe"
# The hashes tiktoken itself pins for OpenAI's published GPT-2 encoding.
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EOS_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern): contractions, letters, digits, other.
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupted or inconsistent."""


def _gpt2_byte_alphabet() -> dict[str, int]:
    """Map each character of GPT-2's printable byte alphabet back to the byte it stands for."""
    # Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 upwards
    # in byte order, so that vocab files never contain whitespace or control characters.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    shifted = (byte for byte in range(256) if byte not in alphabet.values())
    for offset, byte in enumerate(shifted):
        alphabet[chr(256 + offset)] = byte
    return alphabet


# str.translate table from the alphabet to Latin-1 code points, so `.encode("latin-1")` yields
# the bytes; characters outside the alphabet become U+FFFF, which Latin-1 cannot encode.
_TO_LATIN1 = {ord(char): byte for char, byte in _gpt2_byte_alphabet().items()}
_TO_LATIN1.update({code: 0xFFFF for code in range(256) if code not in _TO_LATIN1.values()})


def _read_file(path: Path, expected_sha256: str | None) -> bytes:
    """Read a tokenizer file, checking its SHA-256 when one is expected."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except OSError as error:
        raise TokenizerError(f"cannot read tokenizer file {path}: {error}") from error
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise TokenizerError(
                f"SHA-256 mismatch for tokenizer file {path}: expected {expected_sha256}, "
                f"got {actual} (the file is corrupted or not the expected one)"
            )
    return data


def _token_to_bytes(token: str, path: Path) -> bytes:
    """Turn a token written in GPT-2's byte alphabet into the bytes it stands for."""
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError as error:
        raise TokenizerError(
            f"{path}: token {token!r} has character {token[error.start]!r}, "
            "which is not in GPT-2's byte-level alphabet"
        ) from None


def _parse_vocab(data: bytes, path: Path) -> dict[str, int]:
    """Parse a vocab.json / encoder.json mapping of token string to id."""
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is not valid UTF-8 JSON: {error}") from error
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{path} must hold a non-empty JSON object of token -> id")
    for token, token_id in vocab.items():
        if type(token_id) is not int or token_id < 0:
            raise TokenizerError(f"{path}: token {token!r} has id {token_id!r}, not an int >= 0")
    if len(set(vocab.values())) != len(vocab) or max(vocab.values()) != len(vocab) - 1:
        raise TokenizerError(f"{path}: token ids must be exactly 0..{len(vocab) - 1}, each once")
    return vocab


def _parse_merges(data: bytes, path: Path) -> list[tuple[str, str]]:
    """Parse a merges.txt / vocab.bpe file: a '#version' header, then one 'left right' per line."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise TokenizerError(f"{path} is not valid UTF-8: {error}") from error
    merges = []
    for line_number, line in enumerate(lines, start=1):
        if not line or (line_number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path}, line {line_number}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _mergeable_ranks(
    vocab: dict[str, int], merges: list[tuple[str, str]], vocab_path: Path, merges_path: Path
) -> dict[bytes, int]:
    """Check that vocab and merges describe one BPE and return tiktoken's bytes -> rank map."""
    ranks = {_token_to_bytes(token, vocab_path): token_id for token, token_id in vocab.items()}
    missing_bytes = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing_bytes:
        raise TokenizerError(f"{vocab_path} lacks single-byte tokens for bytes {missing_bytes[:8]}")
    # tiktoken merges the adjacent pair whose concatenation has the lowest id, while a merges
    # file ranks pairs by line; the two agree only if merged ids increase down the file.
    produced: set[str] = set()
    previous_id = -1
    for line_index, (left, right) in enumerate(merges):
        merged = left + right
        merged_id = vocab.get(merged)
        if merged_id is None or merged in produced:
            problem = "is not in" if merged_id is None else "is produced twice for"
            raise TokenizerError(
                f"merge {left!r} + {right!r} ({merges_path}, merge {line_index + 1}) "
                f"{problem} {vocab_path}"
            )
        if merged_id <= previous_id:
            raise TokenizerError(
                f"{vocab_path}: merged token {merged!r} has id {merged_id}, but ids must "
                f"increase in the order of {merges_path} (previous merge had id {previous_id})"
            )
        produced.add(merged)
        previous_id = merged_id
    unreachable = [token for token in vocab if len(token) > 1 and token not in produced]
    if unreachable:
        raise TokenizerError(
            f"{vocab_path} has {len(unreachable)} multi-byte tokens that no merge in "
            f"{merges_path} produces, e.g. {unreachable[:3]}"
        )
    return ranks


class Tokenizer:
    """Byte-level BPE tokenizer (GPT-2 style) backed by tiktoken."""

    def __init__(self, name: str, mergeable_ranks: dict[bytes, int], eos_token_id: int) -> None:
        self.name = name
        self.eos_token_id = eos_token_id
        self._encoding = tiktoken.Encoding(
            name=name,
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens={EOS_TEXT: eos_token_id},
        )
        self.vocab_size = self._encoding.n_vocab
        # id -> bytes, so streaming detokenisation is a list lookup per token.
        self._token_bytes = [b""] * self.vocab_size
        for token, token_id in mergeable_ranks.items():
            self._token_bytes[token_id] = token
        self._token_bytes[eos_token_id] = EOS_TEXT.encode()

    @classmethod
    def default(cls) -> Tokenizer:
        """The bundled GPT-2 tokenizer, SHA-256 verified and loaded once per process."""
        return _load_default()

    @classmethod
    def from_files(
        cls,
        vocab_json: Path,
        merges_txt: Path,
        *,
        vocab_sha256: str | None = None,
        merges_sha256: str | None = None,
        name: str | None = None,
    ) -> Tokenizer:
        """Load a Hugging Face style vocab.json + merges.txt pair, optionally hash-checked."""
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        vocab = _parse_vocab(_read_file(vocab_json, vocab_sha256), vocab_json)
        merges = _parse_merges(_read_file(merges_txt, merges_sha256), merges_txt)
        eos_token_id = vocab.pop(EOS_TEXT, None)
        if eos_token_id is None:
            raise TokenizerError(f"{vocab_json} has no {EOS_TEXT!r} token")
        ranks = _mergeable_ranks(vocab, merges, vocab_json, merges_txt)
        return cls(name or vocab_json.parent.name or "bpe", ranks, eos_token_id)

    @classmethod
    def for_model_dir(cls, path: Path) -> Tokenizer:
        """Use the folder's own vocab.json + merges.txt when it has them, else the default."""
        vocab_json, merges_txt = Path(path) / "vocab.json", Path(path) / "merges.txt"
        if vocab_json.is_file() and merges_txt.is_file():
            return cls.from_files(vocab_json, merges_txt)
        if vocab_json.exists() or merges_txt.exists():
            # Half a pair means the folder's tokenizer is broken; GPT-2's would silently mis-encode.
            raise TokenizerError(
                f"{path} has only one of vocab.json and merges.txt; provide both or neither"
            )
        return cls.default()

    def encode(self, text: str) -> list[int]:
        """Encode text; a literal '<|endoftext|>' in it is plain text, never the special token."""
        return self._encoding.encode_ordinary(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Encode a prompt: '<|endoftext|>' in it is the end-of-text token, GPT-2's document
        separator (as vLLM's and Hugging Face's tokenizers read it), so a prompt decoded from
        token ids encodes back to the same ids."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, replacing invalid UTF-8 with U+FFFD."""
        self._check_ids(ids)
        return self._encoding.decode(ids, errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Decode ids to the raw bytes they stand for."""
        self._check_ids(ids)
        return self._encoding.decode_bytes(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of a single token."""
        if not 0 <= token_id < self.vocab_size:
            self._raise_out_of_range(token_id)
        return self._token_bytes[token_id]

    def token_text(self, token_id: int) -> str:
        """The text of a single token decoded alone (invalid UTF-8 becomes U+FFFD), as
        log-probability listings show it."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _check_ids(self, ids: Sequence[int]) -> None:
        if len(ids) > 0 and (min(ids) < 0 or max(ids) >= self.vocab_size):
            self._raise_out_of_range(next(i for i in ids if not 0 <= i < self.vocab_size))

    def _raise_out_of_range(self, token_id: int) -> NoReturn:
        raise ValueError(
            f"token id {token_id} is out of range for tokenizer {self.name!r} "
            f"(valid ids are 0..{self.vocab_size - 1})"
        )

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=1)
def _load_default() -> Tokenizer:
    return Tokenizer.from_files(
        GPT2_ASSETS_DIR / "encoder.json",
        GPT2_ASSETS_DIR / "vocab.bpe",
        vocab_sha256=GPT2_VOCAB_SHA256,
        merges_sha256=GPT2_MERGES_SHA256,
        name="gpt2",
    )
