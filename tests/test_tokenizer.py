import json

import pytest

from cache_core.bench.tasks import TaskSuite
from cache_core.tokenizer import Tokenizer, load_tokenizer


def test_special_ids_and_vocab():
    tok = Tokenizer()
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size == len(tok) == 3 + 96  # specials + printable ASCII + newline
    assert len({tok.pad_token_id, tok.mask_token_id, tok.eos_token_id}) == 3


def test_round_trip_on_task_text():
    tok = Tokenizer()
    for ex in TaskSuite().split("train", 6):
        for text in (ex.prompt, ex.answer):
            ids = tok.encode(text)
            assert len(ids) == len(text)
            assert min(ids) > tok.eos_token_id  # plain text never encodes to a special token
            assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_skips_pad():
    tok = Tokenizer()
    ids = [tok.pad_token_id] + tok.encode("ab") + [tok.eos_token_id] + tok.encode("zz")
    assert tok.decode(ids) == "ab"
    assert tok.decode([tok.eos_token_id] * 3) == ""
    assert tok.decode(tok.encode("a") + [tok.mask_token_id]) == "a<mask>"


def test_unknown_character_and_bad_ids_raise():
    tok = Tokenizer()
    with pytest.raises(ValueError, match="'é' at index 2"):
        tok.encode("ab\u00e9")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_save_load_round_trip(tmp_path):
    tok = Tokenizer()
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    data = json.loads(path.read_text())  # a Hugging Face tokenizer file, readable by `tokenizers` alone
    assert data["model"]["type"] == "WordLevel"
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(path))
    assert backend.encode("from a:").ids == tok.encode("from a:")
    assert [backend.token_to_id(t) for t in ("<pad>", "<mask>", "<eos>")] == [0, 1, 2]
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab == tok.vocab
    assert Tokenizer.load(path).encode("from a:") == tok.encode("from a:")


def test_legacy_char_file_reads_as_the_same_tokenizer(tmp_path, caplog):
    legacy = {"format": "blockreuse-char", "version": 1, "special_tokens": ["<pad>", "<mask>", "<eos>"],
              "chars": "\n" + "".join(chr(c) for c in range(32, 127))}
    (tmp_path / "tokenizer.json").write_text(json.dumps(legacy))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab == Tokenizer().vocab
    assert "old blockreuse-char format" in caplog.text
    (tmp_path / "tokenizer.json").write_text(json.dumps({**legacy, "chars": 5}))
    with pytest.raises(ValueError, match="without valid 'chars'"):
        Tokenizer.load(tmp_path)


def test_malformed_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file.*tokenizer.json"):
        Tokenizer.load(tmp_path)
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
    path.write_bytes(bytes(range(256)))  # random bytes: named, not a bare UnicodeDecodeError
    with pytest.raises(ValueError, match="tokenizer.json: this tokenizer file is not valid JSON"):
        Tokenizer.load(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object, this one is a list"):
        Tokenizer.load(tmp_path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path)
    good = json.loads(Tokenizer().save(tmp_path / "good").read_text())
    path.write_text(json.dumps({**good, "model": {"type": "NoSuchModel"}}))
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="unique"):
        Tokenizer.builtin("aa")
