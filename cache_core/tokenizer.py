"""A tiny character-level tokenizer for the built-in diffusion LM (no download, plain-JSON on disk).

Ids 0..2 are the special tokens PAD, MASK and EOS; every other id is one printable ASCII character or a newline.
`decode` stops at the first EOS, which is how generated answers end (the rest of the canvas is EOS filling).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cache_core.validate import read_json_object

TOKENIZER_FILE = "tokenizer.json"
FORMAT_NAME = "blockreuse-char"
FORMAT_VERSION = 1
PAD, MASK, EOS = "<pad>", "<mask>", "<eos>"
SPECIAL_TOKENS = (PAD, MASK, EOS)
# Printable ASCII (space to '~') plus newline: covers every task prompt; other characters are an explicit error.
DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


class Tokenizer:
    """Character-level tokenizer with special tokens PAD, MASK and EOS."""

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be unique")
        if any(len(c) != 1 for c in chars) or not chars:
            raise ValueError("tokenizer characters must be a non-empty string of single characters")
        self.chars = chars
        self.vocab: list[str] = list(SPECIAL_TOKENS) + list(chars)
        self._char_to_id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}

    # Ids of the special tokens are fixed by their order in SPECIAL_TOKENS.
    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def mask_token_id(self) -> int:
        return 1

    @property
    def eos_token_id(self) -> int:
        return 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text` (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = []
        for pos, ch in enumerate(text):
            i = self._char_to_id.get(ch)
            if i is None:
                raise ValueError(f"character {ch!r} at index {pos} is not in the tokenizer's vocabulary "
                                 f"(printable ASCII and newline only)")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to (not including) the first EOS. PAD is skipped; a leftover MASK shows as '<mask>'."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary (size {self.vocab_size})")
            if i == self.eos_token_id:
                break
            if i == self.pad_token_id:
                continue
            out.append(self.vocab[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "special_tokens": list(SPECIAL_TOKENS),
                "chars": self.chars}

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/tokenizer.json`; returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read `<directory>/tokenizer.json` (or the file itself when given its path)."""
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        data = read_json_object(path, "tokenizer file")
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a {FORMAT_NAME} tokenizer file (missing or wrong 'format')")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported tokenizer version {data.get('version')!r}, "
                             f"expected {FORMAT_VERSION}")
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"{path}: special_tokens must be {list(SPECIAL_TOKENS)}, "
                             f"got {data.get('special_tokens')!r}")
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise ValueError(f"{path}: 'chars' must be a string, got {type(chars).__name__}")
        return cls(chars)


CharTokenizer = Tokenizer  # descriptive alias


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer.load(directory)
