"""Reference baseline for structured pruning: Torch-Pruning on passforge's bundled trained tiny LLaMA.

What it measures, so passforge's own ``prune-channels`` pass can be compared side by side:

- Torch-Pruning (PyPI ``torch-pruning``; ``DependencyGraph`` + ``BasePruner``/``MetaPruner`` with group-L2 magnitude
  importance, local pruning) removes ``--ratio`` of the SwiGLU intermediate channels in every layer: rows of
  ``gate_proj``/``up_proj`` and columns of ``down_proj``. Attention (q/k/v/o), embeddings, norms and ``lm_head`` are
  ignored layers, so the residual width and heads stay as they are. No fine-tuning afterwards.
- The pruned weight shapes are checked (ffn 512 -> 384 at the default 25%) and the input model is checked unchanged.
- Held-out perplexity (``passforge.eval.perplexity``, the first 16 KiB of the bundled eval text, windows of 128,
  at most 64) of the dense and the pruned model.
- Prefill latency of the dense and the pruned eager models at batch 1 x 256 tokens: median (and min) of
  ``--repeats`` calls after warm-up, both timed round-robin in the same run (one call of each per round, the order
  reversed every other round), plus the median of the per-round dense/pruned ratios; ``torch.inference_mode``,
  ``--threads`` intra-op threads. On a shared 2-core machine expect the speed-up to move by several percent per run.
- Attention-head pruning with Torch-Pruning's ``num_heads``/``prune_num_heads`` (GQA) support on the same model,
  under a time limit; whatever happens (shapes, or the error / time-out) is printed as is. ``--mha-control`` also
  tries it on an MHA variant of the same architecture (random weights), which tells a GQA problem from a general one.

Seen with torch-pruning 1.6.1 / torch 2.13 CPU: MLP pruning works (ffn 512 -> 384). Head pruning on the bundled GQA
model (8 q / 4 kv heads) never returns: building the q/k pruning group in ``DependencyGraph.get_pruning_group`` keeps
adding entries (rotate-half RoPE slices/cat on the narrower k path), so ``BasePruner.__init__`` times out; the same
call on the MHA variant prunes 8 -> 6 heads in well under a second.

Torch-Pruning is an optional dependency, imported only inside :func:`prune_with_torch_pruning`; without it
``main()`` says how to install it and exits 0. Run from the repository root with passforge installed
(``pip install -e .``)::

    pip install torch-pruning==1.6.1   # declares torch>=2.0 and numpy only
    python benchmarks/torch_pruning_ref.py [--ratio 0.25] [--repeats 30] [--threads 2] [--heads-timeout 60]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata

import torch
from torch import Tensor, nn

from passforge.models.llama import Llama

TESTED_VERSION = "1.6.1"  # the torch-pruning release these figures and notes were taken with
IMPORTANCES = ("l2", "l1", "taylor", "random")
TARGETS = ("mlp", "heads")


class TorchPruningTimeout(RuntimeError):
    """Torch-Pruning did not finish within the time limit (its dependency-graph traversal can fail to terminate)."""


def torch_pruning_version() -> str | None:
    """The installed distribution's version (``torch_pruning.__version__`` can lag it), or ``None``."""
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`TorchPruningTimeout` in the main thread after ``seconds`` (no limit elsewhere or if None)."""
    usable = (
        seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return
    start = time.perf_counter()

    def on_alarm(signum: int, frame: object) -> None:
        where = []
        f = frame
        while f is not None:
            code = f.f_code  # type: ignore[attr-defined]
            if f"{os.sep}torch_pruning{os.sep}" in code.co_filename:
                where.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
            f = f.f_back  # type: ignore[attr-defined]
        stack = " <- ".join(where) if where else "outside torch_pruning"
        raise TorchPruningTimeout(
            f"{what} did not finish within {time.perf_counter() - start:.0f} s; interrupted in {stack}"
        )

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _importance(tp: object, name: str) -> object:
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean")
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")
    return tp.importance.RandomImportance()


def prune_with_torch_pruning(
    model: Llama,
    *,
    ratio: float,
    target: str = "mlp",
    calib_tokens: Tensor | None = None,
    importance: str = "l2",
    timeout_s: float | None = 120.0,
) -> nn.Module:
    """A pruned deep copy of ``model`` (in fp32); ``model`` itself is never modified.

    ``target="mlp"``: Torch-Pruning removes ``ratio`` of the FFN intermediate channels in every layer (local pruning:
    the same count per layer, kept = ``int(ffn_dim * (1 - ratio))``); q/k/v/o, embeddings, norms and ``lm_head`` are
    ignored layers. The copy's ``config.ffn_dim`` is updated.

    ``target="heads"``: Torch-Pruning's own multi-head / GQA path (``num_heads`` per q/k/v projection,
    ``prune_num_heads=True``, ``prune_head_dims=False`` so RoPE keeps its head size, ``head_pruning_ratio=ratio``),
    with the MLP, embeddings, norms and ``lm_head`` ignored. On success each ``Attention``'s ``n_heads``/``n_kv_heads``
    are set from the pruned shapes (``config`` is left alone: it derives ``head_dim`` from ``n_heads``).

    ``calib_tokens`` (B, T) int64: traced as the example input (a fixed 1 x 16 sequence when ``None``) and, for
    ``importance="taylor"``, used for the next-token loss whose gradients score the channels. ``importance``: ``"l2"``
    (``GroupMagnitudeImportance(p=2)``), ``"l1"`` (p=1), ``"taylor"`` (``GroupTaylorImportance``) or ``"random"``.

    Raises ``ImportError`` without torch-pruning, :class:`TorchPruningTimeout` when Torch-Pruning runs past
    ``timeout_s`` (main thread only; ``None`` = no limit), and lets Torch-Pruning's own errors through.
    """
    import torch_pruning as tp  # optional dependency

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if importance == "taylor" and calib_tokens is None:
        raise ValueError("importance='taylor' needs calib_tokens for its loss gradients")

    # All of it with autograd on, even under a caller's inference_mode / no_grad: Torch-Pruning reads the graph off
    # grad_fn, and tensors made in inference mode (weights copied, tokens) cannot enter autograd.
    with torch.inference_mode(False), torch.enable_grad():
        return _prune(tp, model, ratio, target, calib_tokens, importance, timeout_s)


def _prune(
    tp: object,
    model: Llama,
    ratio: float,
    target: str,
    calib_tokens: Tensor | None,
    importance: str,
    timeout_s: float | None,
) -> nn.Module:
    cfg = model.config
    pruned = copy.deepcopy(model).float().eval()
    device = pruned.lm_head.weight.device
    if calib_tokens is not None:
        calib_tokens = calib_tokens.clone().long().to(device)  # a normal tensor even if made in inference mode
        example = calib_tokens[:1, : cfg.max_seq_len]
    else:
        example = (torch.arange(16, device=device) % cfg.vocab_size).unsqueeze(0)

    norms = [pruned.norm] + [n for layer in pruned.layers for n in (layer.attention_norm, layer.ffn_norm)]
    norm_weights = [n.weight for n in norms]
    ignored: list[nn.Module | nn.Parameter] = [pruned.tok_embeddings, pruned.lm_head, *norm_weights]
    num_heads: dict[nn.Module, int] = {}
    if target == "mlp":
        ignored += [layer.attention for layer in pruned.layers]
    else:
        ignored += [layer.feed_forward for layer in pruned.layers]
        for layer in pruned.layers:
            attn = layer.attention
            num_heads[attn.q_proj] = attn.n_heads
            num_heads[attn.k_proj] = attn.n_kv_heads
            num_heads[attn.v_proj] = attn.n_kv_heads

    with _time_limit(timeout_s, f"torch-pruning ({target})"):
        pruner = tp.pruner.MetaPruner(  # = tp.pruner.BasePruner
            pruned,
            example_inputs=example,
            importance=_importance(tp, importance),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            # RMSNorm weights are plain nn.Parameters: say which dim is the channel one (and keep them ignored).
            unwrapped_parameters=[(w, 0) for w in norm_weights],
            # Fresh dicts: BasePruner's dict defaults are shared between calls and it mutates them.
            in_channel_groups={},
            out_channel_groups={},
            num_heads=num_heads,
            prune_num_heads=target == "heads",
            prune_head_dims=False,
            head_pruning_ratio=ratio if target == "heads" else 0.0,
        )
        if importance == "taylor":
            pruned.zero_grad(set_to_none=True)
            window = calib_tokens[:, : cfg.max_seq_len + 1]
            logits = pruned(window[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
            loss.backward()
        for group in pruner.step(interactive=True):
            group.prune()
    pruned.zero_grad(set_to_none=True)

    if target == "mlp":
        widths = {layer.feed_forward.gate_proj.out_features for layer in pruned.layers}
        if len(widths) == 1:
            pruned.config = dataclasses.replace(cfg, ffn_dim=widths.pop())
    else:
        for layer in pruned.layers:
            attn = layer.attention
            attn.n_heads = attn.q_proj.out_features // attn.head_dim
            attn.n_kv_heads = attn.k_proj.out_features // attn.head_dim
    return pruned.eval()


# --------------------------------------------------------------------------------------------------------------------
# main(): dense vs Torch-Pruning on the bundled tiny LM


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _check_mlp_shapes(dense: Llama, pruned: nn.Module, kept: int) -> list[str]:
    """Differences from the expected shapes: only gate/up rows and down columns become ``kept``."""
    want = _shapes(dense)
    for name, shape in want.items():
        if name.endswith(("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight")):
            want[name] = (kept, shape[1])
        elif name.endswith("feed_forward.down_proj.weight"):
            want[name] = (shape[0], kept)
    got = _shapes(pruned)
    return [
        f"{n}: want {want.get(n)}, got {got.get(n)}" for n in sorted(set(want) | set(got)) if want.get(n) != got.get(n)
    ]


def _ppl(model: nn.Module, ids: Tensor) -> float:
    from passforge.eval.perplexity import perplexity

    with torch.inference_mode():
        return perplexity(lambda t: model(t), ids, seq_len=128, batch_size=1, max_windows=64)


def _latencies(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``repeats`` each, timed round-robin: one call of each per round, the order
    reversed every other round so neither model always runs first (on a shared machine that position is not free)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for i in range(repeats):
            for k in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    return times


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _heads_summary(model: nn.Module) -> str:
    attn = [layer.attention for layer in model.layers]
    q = sorted({a.q_proj.out_features // a.head_dim for a in attn})
    kv = sorted({a.k_proj.out_features // a.head_dim for a in attn})
    q_w, o_w = tuple(attn[0].q_proj.weight.shape), tuple(attn[0].o_proj.weight.shape)
    return f"q heads {q}, kv heads {kv}, q_proj {q_w}, o_proj {o_w}"


def _try_heads(model: Llama, ratio: float, timeout_s: float, label: str) -> None:
    before = _heads_summary(model)
    t0 = time.perf_counter()
    try:
        pruned = prune_with_torch_pruning(model, ratio=ratio, target="heads", timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the point is to report whatever Torch-Pruning raises
        print(f"  {label}: FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {exc}")
        return
    took = time.perf_counter() - t0
    tokens = (torch.arange(32) % model.config.vocab_size).unsqueeze(0)
    try:
        with torch.inference_mode():
            pruned(tokens)
        runs = "forward runs"
    except Exception as exc:  # noqa: BLE001
        runs = f"forward FAILS: {type(exc).__name__}: {exc}"
    print(f"  {label}: pruned in {took:.1f} s; before: {before}; after: {_heads_summary(pruned)}; {runs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.25, help="fraction of FFN channels (and heads) to remove")
    parser.add_argument("--repeats", type=int, default=30, help="timed prefill calls per model")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seq", type=int, default=256, help="prefill tokens (batch 1)")
    parser.add_argument("--heads-timeout", type=float, default=60.0, help="seconds allowed for head pruning")
    parser.add_argument("--skip-heads", action="store_true", help="do not try attention-head pruning")
    parser.add_argument("--mha-control", action="store_true", help="also try head pruning on an MHA variant")
    args = parser.parse_args(argv)

    version = torch_pruning_version()
    if version is None or importlib.util.find_spec("torch_pruning") is None:
        print(f"torch-pruning not installed: pip install torch-pruning=={TESTED_VERSION}")
        return 0

    from passforge.models import bundled, tokenizer
    from passforge.models.llama import LlamaConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dense = bundled.load_tiny_lm()
    cfg: LlamaConfig = dense.config
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    print(
        f"torch {torch.__version__}, torch-pruning {version}; bundled tiny LM: dim {cfg.dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv heads, ffn {cfg.ffn_dim}; {args.threads} threads"
    )

    t0 = time.perf_counter()
    pruned = prune_with_torch_pruning(dense, ratio=args.ratio, target="mlp", importance="l2")
    prune_s = time.perf_counter() - t0
    kept = int(cfg.ffn_dim * (1 - args.ratio))
    bad = _check_mlp_shapes(dense, pruned, kept)
    untouched = all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    widths = sorted({layer.feed_forward.gate_proj.out_features for layer in pruned.layers})
    shapes = "OK" if not bad else "WRONG: " + "; ".join(bad)
    print(
        f"MLP pruning: {prune_s:.2f} s; ffn widths after {widths} (want {kept}); shapes {shapes}; "
        f"input model {'unchanged' if untouched else 'MODIFIED'}"
    )
    if bad or not untouched:
        return 1

    ids = torch.tensor(tokenizer.encode(bundled.eval_text()[:16384]))
    ppl = {"dense": _ppl(dense, ids), "tp": _ppl(pruned, ids)}
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    times = _latencies({"dense": lambda: dense(tokens), "tp": lambda: pruned(tokens)}, args.repeats)
    wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
    lat = {k: statistics.median(v) for k, v in times.items()}
    # Paired: dense / pruned within each round, so drift in machine load between rounds cancels.
    paired = statistics.median(d / p for d, p in zip(times["dense"], times["tp"]))

    rows = [
        ("dense", cfg.ffn_dim, _params(dense), ppl["dense"], lat["dense"]),
        (f"torch-pruning mlp {args.ratio:g} (l2)", widths[0], _params(pruned), ppl["tp"], lat["tp"]),
    ]
    print()
    print(f"{'model':<30} {'ffn':>4} {'params':>9} {'ppl':>8} {'prefill ms':>11} {'min ms':>8} {'speed-up':>9}")
    for (name, ffn, n, p, t), key in zip(rows, ("dense", "tp")):
        best = min(times[key])
        print(f"{name:<30} {ffn:>4} {n:>9,} {p:>8.3f} {t * 1e3:>11.2f} {best * 1e3:>8.2f} {lat['dense'] / t:>8.2f}x")
    print(
        f"paired speed-up (median over rounds of dense/pruned): {paired:.2f}x; "
        f"ppl ratio pruned/dense {ppl['tp'] / ppl['dense']:.3f}"
    )
    print(
        f"(ppl: first 16 KiB of bundled eval text, 64 windows x 128; prefill: batch 1 x {args.seq} tokens, "
        f"median of {args.repeats} round-robin calls, eager fp32, inference_mode)"
    )
    share = cpu_s / (wall_s * args.threads)
    print(f"CPU share while timing: {share:.0%} of {args.threads} threads x wall time", end="")
    print(
        " -- other processes took the cores: latencies not trustworthy, rerun on a quiet machine" if share < 0.7 else ""
    )

    if not args.skip_heads:
        print()
        print(f"Head pruning with torch-pruning (num_heads / prune_num_heads, ratio {args.ratio:g}):")
        _try_heads(dense, args.ratio, args.heads_timeout, f"bundled GQA ({cfg.n_heads} q / {cfg.n_kv_heads} kv)")
        if args.mha_control:
            mha = Llama(dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)).eval()
            _try_heads(mha, args.ratio, args.heads_timeout, f"MHA control ({cfg.n_heads} q / {cfg.n_heads} kv, random)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
