import pytest
import torch

from passforge.eval.perplexity import perplexity
from passforge.models import bundled
from passforge.models.tokenizer import encode


@pytest.fixture(scope="module")
def model():
    try:
        return bundled.load_tiny_lm()
    except FileNotFoundError as exc:
        pytest.skip(f"bundled tiny LM not generated: {exc}")


def test_tiny_lm_perplexity_on_held_out_text(model):
    assert not model.training
    ids = torch.tensor(encode(bundled.eval_text())[: 8 * 1024])
    ppl = perplexity(model, ids, seq_len=128)
    assert ppl < 20, ppl


def test_texts_have_expected_sizes(model):
    assert 32 * 1024 < len(bundled.eval_text().encode()) <= 64 * 1024
    assert 16 * 1024 < len(bundled.calib_text().encode()) <= 32 * 1024


def test_missing_artefact_error_says_how_to_create_it():
    with pytest.raises(FileNotFoundError, match=r"python -m passforge\.models\.train_tiny"):
        bundled._data("does-not-exist.safetensors")
