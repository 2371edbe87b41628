from passforge.models.tokenizer import VOCAB_SIZE, decode, encode


def test_roundtrip_ascii_and_unicode():
    for text in ["", "def f(x):\n    return x\n", "héllo → 世界 🐍"]:
        ids = encode(text)
        assert all(0 <= i < VOCAB_SIZE for i in ids)
        assert decode(ids) == text


def test_encode_is_utf8_bytes():
    assert encode("aé") == [97, 0xC3, 0xA9]


def test_decode_replaces_invalid_utf8():
    assert decode([0xC3]) == "\ufffd"


def test_ids_beyond_the_bytes_decode_as_replacement_characters():
    """llama-100m has 32000 ids on this byte tokenizer; its samples must print (an H100 CLI run crashed here)."""
    assert decode([104, 300, 105, 70000]) == "h\ufffdi\ufffd"
    assert decode([0xE2, 0x82, 0xAC, 256]) == "\u20ac\ufffd"
