import numpy as np
import pytest

from tessera.data import ByteTokenizer, get_tokenizer


def test_byte_ids_and_roundtrip():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.encode("hé") == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3]
    text = "417+38=455 ünïcødé ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.array([1, *tok.encode("ab"), 2, 0, 0])) == "ab"


def test_decode_invalid_utf8_is_replaced():
    assert ByteTokenizer().decode([0xFF + 3, ord("a") + 3]) == "\ufffda"


@pytest.mark.parametrize("bad", [259, 300, -1])
def test_decode_out_of_range_id(bad):
    with pytest.raises(ValueError, match=f"token id {bad} out of range"):
        ByteTokenizer().decode([5, bad])


def test_get_tokenizer():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"unknown tokenizer 'spm'; known: byte"):
        get_tokenizer("spm")
