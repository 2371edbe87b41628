import math

import pytest
import torch

from passforge.eval.compare import cosine_similarity, greedy_agreement, logits_kl, max_abs_err


def test_kl_of_identical_logits_is_zero():
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0))
    assert logits_kl(x, x.clone()) == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_hand_computation():
    # Position 0: p = (1/2, 1/2), q = (1/4, 3/4); KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # Position 1: identical, KL = 0. Mean over positions halves it.
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    x = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
    assert logits_kl(ref, x) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-5)
    assert logits_kl(ref, x) > 0


def test_kl_computes_in_fp32_for_half_inputs():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    assert logits_kl(x.bfloat16(), x.bfloat16()) == 0.0


def test_max_abs_err():
    assert max_abs_err(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.5, -4.0, 3.0])) == 2.0


def test_cosine_similarity():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    assert cosine_similarity(x, x.clone()) == 1.0  # exactly, not 1 - rounding
    assert cosine_similarity(x, 3 * x) == pytest.approx(1.0, abs=1e-12)  # scale-free
    assert cosine_similarity(x, -x) == pytest.approx(-1.0, abs=1e-12)
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(math.sqrt(0.5))


def test_greedy_agreement():
    assert greedy_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75


@pytest.mark.parametrize("fn", [logits_kl, max_abs_err, cosine_similarity, greedy_agreement])
def test_shape_mismatch_raises(fn):
    with pytest.raises(ValueError, match="shape mismatch"):
        fn(torch.zeros(2, 3), torch.zeros(3, 2))
