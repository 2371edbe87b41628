"""Data files for calibration and evaluation: text through the tokenizer, or token ids as they are."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from passforge.models.registry import ModelError, ModelSource, read_tokens
from passforge.models.tokenizer import encode

SOURCE = ModelSource("byte-lm", None, (), is_lm=True, encode=encode)


def test_text_json_and_safetensors(tmp_path):
    (tmp_path / "a.txt").write_text("def f(): pass\n", encoding="utf-8")
    assert read_tokens(tmp_path / "a.txt", SOURCE).tolist() == encode("def f(): pass\n")
    (tmp_path / "ids.json").write_text("[5, 7, 9, 1000]", encoding="utf-8")
    assert read_tokens(tmp_path / "ids.json", SOURCE).tolist() == [5, 7, 9, 1000]
    save_file({"ids": torch.arange(6, dtype=torch.int32).view(2, 3)}, tmp_path / "ids.safetensors")
    ids = read_tokens(tmp_path / "ids.safetensors", SOURCE)
    assert ids.dtype == torch.long and ids.tolist() == list(range(6))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.json", "{\"ids\": 3}", "JSON list of non-negative integers"),
    ("neg.json", "[1, -2]", "non-negative"),
    ("bool.json", "[1, true]", "non-negative integers"),
    ("broken.json", "[1, 2", "not a JSON list"),
    ("junk.safetensors", "not safetensors", "not a readable safetensors"),
])
def test_bad_token_files_are_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ModelError, match=message):
        read_tokens(tmp_path / name, SOURCE)


@pytest.mark.parametrize(("tensor", "message"), [
    (torch.randn(4), "integer tensor"),
    (torch.ones(4, dtype=torch.bool), "integer tensor"),
    (torch.tensor([3, -1]), "non-negative"),
])
def test_float_bool_or_negative_tensors_are_not_token_ids(tmp_path, tensor, message):
    save_file({"x": tensor}, tmp_path / "f.safetensors")
    with pytest.raises(ModelError, match=message):
        read_tokens(tmp_path / "f.safetensors", SOURCE)
