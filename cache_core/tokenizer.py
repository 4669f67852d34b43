"""One tokenizer path for every model: a Hugging Face fast tokenizer (`tokenizer.json`) behind a small interface.

A real model directory (LLaDA, Dream, LLaDA-MoE) is read with `transformers.PreTrainedTokenizerFast` from its
`tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`, whose chat template Instruct models use); the
class named in `tokenizer_config.json` is not imported, so no code shipped with a model ever runs. The mask, EOS and
pad ids come from the model's `config.json` when it has them (the model was trained with those), else from the
tokenizer. The built-in model's tokenizer is the same kind of file: a character-level WordLevel tokenizer with ids
0..2 = `<pad>`, `<mask>`, `<eos>` and one id per printable ASCII character or newline.

`decode` stops at the first stop token (EOS, end-of-turn), as LLaDA's and Dream's generations are read: tokens after
it never count in exact match.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cache_core.validate import read_json_object

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
LEGACY_FORMAT = "blockreuse-char"  # our own tokenizer.json before it became a Hugging Face file
PAD, MASK, EOS = "<pad>", "<mask>", "<eos>"
SPECIAL_TOKENS = (PAD, MASK, EOS)
# Printable ASCII (space to '~') plus newline: covers every built-in task prompt.
DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
# End-of-turn / end-of-text tokens of the supported families' tokenizers: generation ends at any of them.
END_TOKENS = ("<|eot_id|>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|end|>")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(i) for i in values if isinstance(i, int) and not isinstance(i, bool)]


def char_level_backend(chars: str = DEFAULT_CHARS):
    """The built-in character-level tokenizer as a `tokenizers.Tokenizer` (WordLevel over single characters)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
        raise ValueError("tokenizer characters must be a non-empty string of unique single characters")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)})
    backend = Backend(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def _char_level(chars: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=char_level_backend(chars), pad_token=PAD, mask_token=MASK,
                                   eos_token=EOS)


class Tokenizer:
    """encode / decode / chat template over a Hugging Face fast tokenizer, with the model's special ids.

    `Tokenizer()` is the built-in character tokenizer; `Tokenizer.load(directory)` reads a model directory."""

    def __init__(self, hf: Any = None, *, mask_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, stop_ids: Iterable[int] = (), source: str = "built-in"):
        hf = self.hf = _char_level(DEFAULT_CHARS) if hf is None else hf
        self.source = source
        self.mask_token_id = mask_token_id if mask_token_id is not None else hf.mask_token_id
        if self.mask_token_id is None:
            raise ValueError(f"{source}: no mask token id: neither the model's config.json (mask_token_id) nor the "
                             "tokenizer names one")
        self.eos_token_id = eos_token_id if eos_token_id is not None else hf.eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else (
            hf.pad_token_id if hf.pad_token_id is not None else self.eos_token_id)
        self._vocab = hf.get_vocab()  # built once: a real tokenizer's vocabulary is ~150k entries
        stops = set(stop_ids) | set(_ids(self.eos_token_id)) | {self._vocab[t] for t in END_TOKENS if t in self._vocab}
        self.stop_ids = frozenset(stops)
        # Ids the model can predict: its embedding may be padded past the tokenizer (Dream, LLaDA); `check_model` sets
        # it. Until then only the tokenizer's own ids decode.
        self.model_vocab_size = len(hf)

    # --- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def builtin(cls, chars: str = DEFAULT_CHARS) -> Tokenizer:
        return cls(_char_level(chars))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer of a model or checkpoint directory (or of a tokenizer.json path), with the special ids of
        the directory's config.json and generation_config.json where present."""
        from transformers import PreTrainedTokenizerFast

        path = Path(directory)
        directory = path.parent if path.is_file() else path
        file = directory / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {file}: a model directory needs Hugging Face's tokenizer.json (if it has only "
                "vocab.json/merges.txt, write one with transformers: AutoTokenizer.from_pretrained(dir)"
                ".save_pretrained(dir))")
        data = read_json_object(file, "tokenizer file")
        if data.get("format") == LEGACY_FORMAT:
            chars = data.get("chars")
            if not isinstance(chars, str) or data.get("special_tokens") != list(SPECIAL_TOKENS):
                raise ValueError(f"{file}: a {LEGACY_FORMAT} tokenizer file without valid 'chars'/'special_tokens'")
            log.warning("%s is the old blockreuse-char format; read as the same character tokenizer (re-save the "
                        "checkpoint to write the Hugging Face file)", file)
            return cls.builtin(chars)
        if "model" not in data:
            raise ValueError(f"{file} is not a Hugging Face tokenizer.json (no 'model' entry)")
        try:
            # The concrete class, not AutoTokenizer: a tokenizer_class / auto_map naming shipped code is never imported.
            hf = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        except Exception as err:  # transformers raises many kinds; the user needs the file and the reason
            raise ValueError(f"{file}: cannot load the tokenizer ({type(err).__name__}: {err})") from err
        config = _optional_json(directory / "config.json")
        generation = _optional_json(directory / "generation_config.json")
        eos = _ids(config.get("eos_token_id"))
        return cls(hf, mask_token_id=_first(config.get("mask_token_id")), eos_token_id=eos[0] if eos else None,
                   pad_token_id=_first(config.get("pad_token_id")),
                   stop_ids=eos + _ids(generation.get("eos_token_id")), source=str(file))

    # --- the interface the engine uses ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab(self) -> list[str]:
        """Tokens by id."""
        tokens = [""] * self.vocab_size
        for token, i in self._vocab.items():
            if i < len(tokens):
                tokens[i] = token
        return tokens

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text` (no BOS/EOS added unless asked: prompts built by templates carry their own)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as err:  # the char-level WordLevel model has no unknown token: name the character
            for pos, ch in enumerate(text):
                if ch not in self._vocab:
                    raise ValueError(f"character {ch!r} at index {pos} is not in the tokenizer's vocabulary "
                                     f"({self.source})") from err
            raise ValueError(f"cannot encode the text with {self.source}: {err}") from err

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to (not including) the first stop token; padding is skipped, a leftover mask shows as
        the mask token."""
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.stop_ids:
                break
            if i == self.pad_token_id:
                continue
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            if i != self.mask_token_id and not 0 <= i < self.model_vocab_size:
                model = f", model {self.model_vocab_size}" if self.model_vocab_size > self.vocab_size else ""
                raise ValueError(f"token id {i} outside the vocabulary (size {self.vocab_size}{model})")
            # The model's own mask, or a padding row of its embedding the tokenizer has no text for: shown, so that
            # an answer holding one never matches by accident.
            pieces += [self._decode(run), MASK if i == self.mask_token_id else f"<unused:{i}>"]
            run = []
        return "".join([*pieces, self._decode(run)])

    def _decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation rendered with the model's chat template (tokenizer_config.json), as LLaDA's and
        Dream's chat code does: the rendered text already holds its special tokens, so none are added."""
        if not self.has_chat_template:
            raise ValueError(f"{self.source} has no chat template (tokenizer_config.json 'chat_template'); it is a "
                             "base model: encode the prompt text directly")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.encode(text)

    def check_model(self, vocab_size: int, source: str) -> None:
        """Refuse a tokenizer whose ids reach past the model's embedding (it belongs to another model)."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.source} has {self.vocab_size} tokens but the model ({source}) predicts only "
                             f"{vocab_size} (vocab_size): the tokenizer belongs to another model")
        self.model_vocab_size = vocab_size

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json into `directory`; returns the tokenizer.json path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        return directory / TOKENIZER_FILE


def _first(value: Any) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "config") if path.is_file() else {}


CharTokenizer = Tokenizer  # descriptive alias


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer.load(directory)
