"""Shared fixtures: small seeded models and their captured graphs (built per test, never shared mutably)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from passforge.ir.capture import capture
from passforge.models.llama import Llama, LlamaConfig

SMALL = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


class TiedEmbeddingHead(torch.nn.Module):
    """Embedding and output head sharing one weight (as GPT-2 / Llama-3.2 do); also returns the shared weight,
    a parameter as a graph output."""

    def __init__(self, vocab: int = 32, dim: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.emb(ids)), self.head.weight


class Tripwire:
    """Unpickling this creates ``marker``: a loader that unpickles (and so could run code) leaves evidence."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (README's test command runs two workers): one intra-op thread per worker, so two
    workers on two cores do not oversubscribe them. Most of the suite is single-threaded Python (capture,
    export, graph passes); the workers overlap it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["onednn.qlinear_pointwise", "aten._int_mm"])
def static_cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each CPU implementation of ``passforge::int8_static_linear`` in turn, by :func:`backend`'s name: oneDNN's
    u8 × s8 linear (skipped on a CPU without VNNI) and ``torch._int_mm``, which such CPUs run (forced here)."""
    import passforge.kernels.ops as ops

    if request.param == "aten._int_mm":
        monkeypatch.setattr(ops, "onednn_int8_exact", lambda: False)
    elif not ops.onednn_int8_exact():
        pytest.skip("no oneDNN u8 x s8 linear with VNNI on this CPU")
    return request.param


@pytest.fixture
def small_llama() -> Llama:
    torch.manual_seed(0)
    return Llama(SMALL).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def llama_graph(small_llama: Llama, tokens: torch.Tensor) -> torch.fx.GraphModule:
    return capture(small_llama, (tokens,))


@pytest.fixture(scope="session")
def bundled_lm_and_text() -> tuple[torch.nn.Module, torch.Tensor]:
    """The bundled trained LM and 16 KiB of its held-out text as byte ids (skips if the weights are absent)."""
    from passforge.models import bundled
    from passforge.models.tokenizer import encode

    try:
        model = bundled.load_tiny_lm()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return model, torch.tensor(encode(bundled.eval_text()[:16384]))


def cpu_scaled_mm_takes_row_scales() -> bool:
    """Some PyTorch releases' CPU ``_scaled_mm`` take per-tensor scales only (2.11 does; 2.13 takes rows): the
    tests that run passforge's row-wise call on the CPU skip there."""
    e4m3 = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(e4m3, e4m3.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def held_out_ppl(model_fn, ids: torch.Tensor) -> float:
    """Perplexity over 64 non-overlapping 128-byte windows (8 KiB) of held-out text."""
    from passforge.eval.perplexity import perplexity

    with torch.inference_mode():
        return perplexity(model_fn, ids, seq_len=128, batch_size=1, max_windows=64)
