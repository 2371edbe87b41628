import math

import pytest
import torch

from passforge.eval.perplexity import perplexity

V = 256


def uniform(tokens: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*tokens.shape, V)


def make_bigram(seed: int = 0):
    """A context-free model: logits depend only on the current token."""
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed))
    return lambda tokens: table[tokens]


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_uniform_model_has_perplexity_vocab_size():
    assert perplexity(uniform, ids(1000), seq_len=32) == pytest.approx(256, rel=1e-3)


def test_perfect_model_has_perplexity_one():
    def oracle(tokens):
        return torch.nn.functional.one_hot((tokens + 1) % V, V).float() * 100

    stream = torch.arange(600) % V
    assert perplexity(oracle, stream, seq_len=16, batch_size=3) == pytest.approx(1.0, abs=1e-6)


def test_matches_direct_nll_over_non_overlapping_windows():
    model, stream, L = make_bigram(), ids(4 * 16 + 5), 16
    # Full windows only: 4 windows of 16 targets; the 4 trailing tokens are dropped.
    logp = torch.log_softmax(model(stream[: 4 * L]), dim=-1)
    nll = -logp[torch.arange(4 * L), stream[1 : 4 * L + 1]].mean()
    assert perplexity(model, stream, seq_len=L, batch_size=3) == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_overlapping_stride_scores_each_target_once():
    model, L = make_bigram(), 16
    stream = ids(5 * L + 1)
    full = perplexity(model, stream, seq_len=L)
    assert perplexity(model, stream, seq_len=L, stride=4, batch_size=5) == pytest.approx(full, rel=1e-5)


def test_max_windows_limits_scored_text():
    model, L = make_bigram(), 16
    stream = ids(10 * L + 1)
    assert perplexity(model, stream, seq_len=L, max_windows=2) == pytest.approx(
        perplexity(model, stream[: 2 * L + 1], seq_len=L), rel=1e-6
    )


@pytest.mark.parametrize(
    ("stream", "kwargs"),
    [
        (ids(10), {"seq_len": 16}),
        (ids(100), {"seq_len": 16, "stride": 17}),
        (ids(100).view(10, 10), {"seq_len": 4}),
    ],
)
def test_invalid_arguments(stream, kwargs):
    with pytest.raises(ValueError):
        perplexity(uniform, stream, **kwargs)
