"""fuse-attention and local-attention: every spelling of attention becomes one passforge::attention call.

Structure (no softmax / SDPA / repeated k-v left, one op per layer), numerics (assert_close against the graph
before the pass: the op is exact attention, only the summation order differs — fp32 agrees to 1e-5), counts and
negatives (tags per variant, near misses that must not fire with their reasons, a second run changes nothing).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passforge.ir.capture import capture
from passforge.ir.graph import count_calls
from passforge.models import llama, nanogpt
from passforge.passes.attention import FuseAttention, find_attention
from passforge.passes.base import Context, PassError
from passforge.passes.manager import PassManager

ATTENTION = torch.ops.passforge.attention.default
aten = torch.ops.aten
TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32: the same math, another summation order
B, H, HKV, T, D = 2, 4, 2, 11, 16


def run(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], spec: str = "fuse-attention"):
    result = PassManager.parse(spec).run(gm, Context(example_inputs=inputs))
    return result.graph, result.records[-1]


def first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class Attn(nn.Module):
    """One attention spelled as ``variant`` says, over q (B, H, T, D) and k, v (B, HKV, T, D)."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.register_buffer("tril", torch.tril(torch.ones(T, T)).view(1, 1, T, T), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        variant, scale = self.variant, 1.0 / math.sqrt(D)
        if variant == "sdpa-enable_gqa":  # SDPA's own GQA: k/v stay in their head count
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if "flat-kt-gqa" in variant:  # torch.onnx with static shapes: repeat and flatten in one view
            kt = k[:, :, None].expand(B, HKV, H // HKV, T, D).reshape(B * H, T, D).transpose(1, 2).view(B, H, D, T)
        if "mqa" in variant:
            k, v = k[:, :1].expand(B, H, T, D), v[:, :1].expand(B, H, T, D)
        elif "repeat_interleave" in variant:
            k, v = k.repeat_interleave(H // HKV, dim=1), v.repeat_interleave(H // HKV, dim=1)
        else:  # HF repeat_kv
            k = k[:, :, None].expand(B, HKV, H // HKV, T, D).reshape(B, H, T, D)
            v = v[:, :, None].expand(B, HKV, H // HKV, T, D).reshape(B, H, T, D)
        if variant.startswith("sdpa"):
            return F.scaled_dot_product_attention(q, k, v, is_causal="causal" in variant)
        if "scale-q" in variant:
            s = (q * scale) @ k.transpose(-2, -1)
        elif "scale-qk" in variant:
            s = (q * scale**0.5) @ (k * scale**0.5).transpose(-2, -1)
        elif "div" in variant:
            s = q @ k.transpose(2, 3) / math.sqrt(D)
        elif "flat-kt-gqa" in variant:
            s = q @ kt
        elif "flat-kt" in variant:  # torch.onnx's kᵀ: through a (B·H, T, D) view
            s = q @ k.reshape(B * H, T, D).transpose(1, 2).reshape(B, H, D, T)
        else:
            s = q @ k.transpose(-2, -1)
        if "fp32" in variant:
            s = s.float()
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if "masked_fill" in variant:
            s = s.masked_fill(self.tril[:, :, :T, :T] == 0, float("-inf"))
        elif "where" in variant:
            s = torch.where(causal, s, torch.finfo(s.dtype).min)
        elif "additive" in variant:
            s = s + torch.zeros(T, T).masked_fill(~causal, float("-inf"))
        if not ("scale-q" in variant or "div" in variant):
            s = s * scale
        p = F.softmax(s, dim=-1)
        p = F.dropout(p, 0.1, training=False).to(q.dtype)
        return p @ v


VARIANTS = {  # variant -> tags the match must carry
    "masked_fill": {"explicit", "mask:masked_fill", "mask→causal", "scale-after-mask", "gqa:expand×2"},
    "where": {"mask:where", "mask→causal"},
    "additive": {"mask:additive", "mask→causal", "scale-after-mask"},
    "div-masked_fill": {"scale", "mask→causal"},
    "scale-q-where": {"scale-on-q/k", "mask→causal"},
    "scale-qk-additive": {"scale-on-q/k", "mask→causal"},
    "fp32-masked_fill": {"mask→causal"},  # .float() on fp32 scores: export drops the no-op cast
    "nomask": {"explicit", "scale"},
    "flat-kt-where": {"mask:where", "mask→causal"},
    "flat-kt-gqa-additive": {"mask:additive", "mask→causal", "gqa:expand×2"},
    "mqa-masked_fill": {"mqa:expand×4"},
    "repeat_interleave-where": {"gqa:repeat_interleave×2"},
    "sdpa-causal": {"sdpa", "gqa:expand×2"},
    "sdpa": {"sdpa"},
    "sdpa-enable_gqa": {"sdpa", "gqa:enable_gqa×2"},
}


def qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    shapes = ((B, H, T, D), (B, HKV, T, D), (B, HKV, T, D))
    return tuple(torch.randn(s, generator=gen).to(dtype) for s in shapes)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_spelling_becomes_one_op(variant: str) -> None:
    inputs = qkv()
    gm = capture(Attn(variant), inputs)
    expected = gm(*inputs)
    (match,), misses = find_attention(gm)
    assert not misses
    assert VARIANTS[variant] <= set(match.tags), match.tags
    assert match.scale == pytest.approx(1 / math.sqrt(D))
    after, record = run(gm, inputs)
    assert count_calls(after, ATTENTION) == 1
    for op in (
        aten.softmax.int,
        aten.matmul.default,
        aten.scaled_dot_product_attention.default,
        aten.expand.default,
        aten.repeat_interleave.self_int,
        aten.masked_fill.Scalar,
        aten.where.self,
    ):
        assert count_calls(after, op) == 0, op
    torch.testing.assert_close(after(*inputs), expected, **TOL)
    assert record.stats["fused"] == 1
    node = next(n for n in after.graph.nodes if n.target is ATTENTION)
    assert node.kwargs["causal"] == ("nomask" not in variant and variant != "sdpa")
    assert node.args[3] is None  # every mask here is constant causal (or none): folded into the flags
    again, record = run(after, inputs)  # idempotent
    assert record.stats["fused"] == 0 and not record.modified
    assert count_calls(again, ATTENTION) == 1


def test_bf16_attention_fuses_within_bf16_rounding() -> None:
    """In bf16 the explicit graph rounds scores and probabilities to bf16; the op keeps them in fp32, so the two
    differ by bf16 rounding: a few ulp of bf16 (2^-8 relative) of outputs of size ~1."""
    inputs = qkv(torch.bfloat16)
    gm = capture(Attn("fp32-masked_fill"), inputs)
    expected = gm(*inputs)
    (match,), _ = find_attention(gm)
    assert "softmax-fp32" in match.tags
    after, _ = run(gm, inputs)
    assert count_calls(after, ATTENTION) == 1
    torch.testing.assert_close(after(*inputs).float(), expected.float(), rtol=0, atol=4 * 2**-8)


class PaddedAttn(nn.Module):
    """Causal attention plus a key-padding mask that arrives as an input: a runtime mask the op must take."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        return s.softmax(-1) @ v


def test_runtime_mask_is_passed_to_the_op() -> None:
    q, k, v = qkv()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 7:] = False
    gm = capture(PaddedAttn(), (q, k, v, keep))
    expected = gm(q, k, v, keep)
    (match,), _ = find_attention(gm)
    assert "mask:runtime" in match.tags
    after, _ = run(gm, (q, k, v, keep))
    node = next(n for n in after.graph.nodes if n.target is ATTENTION)
    assert node.args[3] is not None and node.args[3].target is aten.logical_not.default  # fill mask → keep mask
    torch.testing.assert_close(after(q, k, v, keep), expected, **TOL)
    keep[0, 3:] = False  # a different mask at run time: the graph computes it, nothing was baked in
    torch.testing.assert_close(after(q, k, v, keep), gm(q, k, v, keep), **TOL)


class BandAttn(nn.Module):
    """A constant sliding-window (band) mask, as Mistral-style models build it from aranges."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        i = torch.arange(T).view(-1, 1)
        j = torch.arange(T).view(1, -1)
        band = (j <= i) & (j > i - 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def test_constant_band_mask_becomes_a_window() -> None:
    q, k, v = qkv()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    gm = capture(BandAttn(), (q, k, v))
    expected = gm(q, k, v)
    after, _ = run(gm, (q, k, v))
    node = next(n for n in after.graph.nodes if n.target is ATTENTION)
    assert (node.kwargs["causal"], node.kwargs["window"], node.args[3]) == (True, 4, None)
    torch.testing.assert_close(after(q, k, v), expected, **TOL)


class NotAttention(nn.Module):
    """Near misses: softmax over the wrong dim, probabilities returned too, a finite fill value, a classifier
    softmax over logits (no matmul below it)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = q @ k.transpose(-2, -1)
        wrong_dim = s.softmax(dim=-2) @ v
        p = (s * 0.25).softmax(-1)
        returned = p @ v
        finite = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -1.0).softmax(-1) @ v
        classifier = q.mean(-1).softmax(-1)
        return wrong_dim, returned, p, finite, classifier


def test_near_misses_do_not_fire_and_say_why() -> None:
    q, k, v = qkv()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    gm = capture(NotAttention(), (q, k, v))
    matches, misses = find_attention(gm)
    assert matches == []
    reasons = " | ".join(reason for _, reason in misses)
    assert "softmax over dim -2" in reasons
    assert "probabilities" in reasons and "users" in reasons
    assert "not -inf" in reasons
    assert "3-d tensor" in reasons
    after, record = run(gm, (q, k, v))
    assert count_calls(after, ATTENTION) == 0 and not record.modified
    assert record.stats["near_misses"] == 4
    assert any("near miss" in note for note in record.notes)
    assert any("near miss" in line for line in FuseAttention.explain(gm))


class ScrambledKeys(nn.Module):
    """The flattened kᵀ spelling with the wrong dims swapped: (T, B·H, D) viewed as (B, H, D, T) is not kᵀ."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kt = k.reshape(B * H, T, D).permute(1, 0, 2).reshape(B, H, D, T)
        return (q @ kt * 0.25).softmax(-1) @ v


def test_a_scrambled_flattened_k_transpose_is_a_near_miss() -> None:
    q, k, v = qkv()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    gm = capture(ScrambledKeys(), (q, k, v))
    matches, misses = find_attention(gm)
    assert matches == [] and "not a transposed k" in misses[0][1]


def test_nanogpt_attention_fuses() -> None:
    model = nanogpt.build("tiny").eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    gm = capture(model, (tokens,))
    after, record = run(gm, (tokens,), "cleanup,fuse-attention")
    assert count_calls(after, ATTENTION) == model.config.n_layer
    assert count_calls(after, aten.softmax.int) == 0
    assert record.stats["tag:mask→causal"] == model.config.n_layer
    torch.testing.assert_close(after(tokens), model(tokens), **TOL)


def test_llama_prefill_and_decode_fuse_with_native_gqa() -> None:
    model = llama.build("tiny").eval()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    prefill = capture(llama.PrefillStep(model), (tokens,))
    after, _ = run(prefill, (tokens,))
    assert count_calls(after, ATTENTION) == cfg.n_layers
    assert count_calls(after, aten.expand.default) == 0  # k/v are no longer repeated
    for got, want in zip(after(tokens), prefill(tokens)):
        torch.testing.assert_close(got, want, **TOL)

    _, k_cache, v_cache = model.prefill(tokens)
    step = (tokens[:, -1:], torch.tensor([24]), k_cache, v_cache)
    decode = capture(llama.DecodeStep(model), step)
    after, _ = run(decode, step)
    node = next(n for n in after.graph.nodes if n.target is ATTENTION)
    assert node.args[3] is not None  # arange(S) <= pos depends on the input position: a runtime mask
    for got, want in zip(after(*step), decode(*step)):
        torch.testing.assert_close(got, want, **TOL)


def test_local_attention_sets_window_and_sinks() -> None:
    inputs = qkv()
    gm = capture(Attn("masked_fill"), inputs)
    after, record = run(gm, inputs, "fuse-attention,local-attention(window=3,sinks=1)")
    node = next(n for n in after.graph.nodes if n.target is ATTENTION)
    assert (node.kwargs["window"], node.kwargs["sinks"]) == (3, 1)
    assert record.stats["windowed"] == 1
    q, k, v = inputs
    from passforge.kernels.attention import attention_reference

    want = attention_reference(q, k, v, causal=True, window=3, sinks=1)
    torch.testing.assert_close(after(*inputs), want, **TOL)
    _, again = run(after, inputs, "local-attention(window=3,sinks=1)")
    assert not again.modified


def test_local_attention_needs_fused_attention_and_sane_options() -> None:
    inputs = qkv()
    gm = capture(Attn("masked_fill"), inputs)
    with pytest.raises(PassError, match="run fuse-attention first"):
        run(gm, inputs, "local-attention(window=4)")
    with pytest.raises(Exception, match="window must be >= 1"):
        PassManager.parse("local-attention(window=0)")


@pytest.mark.parametrize("spec", ["fuse-attention,cast(dtype=bf16)", "cast(dtype=bf16),fuse-attention"])
def test_fuse_attention_and_cast_in_either_order(spec: str) -> None:
    """cast treats passforge::attention as a low-precision op (like SDPA); after cast, the k/v repetition is
    followed by a dtype cast, which the matcher moves onto the un-repeated k/v."""
    model = llama.build("tiny").eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    gm = capture(model, (tokens,))
    after, _ = run(gm, (tokens,), spec)
    assert count_calls(after, ATTENTION) == model.config.n_layers
    cast_only, _ = run(gm, (tokens,), "cast(dtype=bf16)")
    want = cast_only(tokens)
    # both graphs run attention in bf16 with fp32 accumulation; they differ in bf16 rounding of the scores
    torch.testing.assert_close(after(tokens), want, rtol=0, atol=4 * 2**-8 * want.abs().max().item())


class Tricky(nn.Module):
    """Spellings that look like attention but must not fuse as is (``kind`` picks one), and ones that must."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("batch_mask", torch.zeros(B, 1, T, T), persistent=False)  # enlarges a batch of 1

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q @ k.transpose(-2, -1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if self.kind == "add-alpha":
            return torch.add(s, torch.zeros(T, T).masked_fill(~causal, float("-inf")), alpha=0.5).softmax(-1) @ v
        if self.kind == "bool-added":  # adds 1.0 where True: a bias, not a mask
            return (s + causal).softmax(-1) @ v
        if self.kind == "mask-enlarges-batch":
            return (s + self.batch_mask).softmax(-1) @ v
        if self.kind == "chained":
            inner = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(inner, k, v, is_causal=True)
        if self.kind == "view-after-elementwise":  # reads the contiguous (B, H, T, D) layout through a view
            return (F.scaled_dot_product_attention(q, k, v) * 2.0).view(B, -1)
        raise AssertionError(self.kind)


@pytest.mark.parametrize(
    ("kind", "fused"),
    [("add-alpha", 0), ("bool-added", 0), ("mask-enlarges-batch", 0), ("chained", 2), ("view-after-elementwise", 1)],
)
def test_tricky_spellings_are_refused_or_fused_exactly(kind: str, fused: int) -> None:
    q, k, v = qkv()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    if kind == "mask-enlarges-batch":
        q, k, v = q[:1], k[:1], v[:1]
    gm = capture(Tricky(kind), (q, k, v))
    after, record = run(gm, (q, k, v))
    assert record.stats["fused"] == fused
    torch.testing.assert_close(after(q, k, v), gm(q, k, v), **TOL)


def test_local_attention_keeps_a_models_own_window() -> None:
    q, k, v = qkv()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    gm = capture(BandAttn(), (q, k, v))  # a window of 4 from the model's own band mask
    after, record = run(gm, (q, k, v), "fuse-attention,local-attention(window=8,sinks=0)")
    node = next(n for n in after.graph.nodes if n.target is ATTENTION)
    assert node.kwargs["window"] == 4 and not record.modified
    assert any("own window=4" in note for note in record.notes)
    torch.testing.assert_close(after(q, k, v), gm(q, k, v), **TOL)
