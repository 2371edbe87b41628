"""Train the bundled byte-level tiny LM on the Python standard library's own source.

The corpus is whatever ``.py`` files ship with the running interpreter's stdlib (PSF licence):
offline, redistributable and identical for anyone with the same Python version. Files are
sorted by relative path and every ``--holdout-every``-th file is held out for evaluation, so the
held-out text is unseen *files*, not just unseen windows of seen files.

    python -m passforge.models.train_tiny --out passforge/models/data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from passforge.eval.perplexity import perplexity
from passforge.models.llama import PRESETS, Llama, build

EVAL_TEXT_BYTES = 64 * 1024
CALIB_TEXT_BYTES = 32 * 1024


def stdlib_files(root: Path) -> list[Path]:
    """All stdlib ``.py`` files under ``root`` (third-party site-packages excluded), sorted by path."""
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_corpus(files: list[Path], holdout_every: int) -> tuple[bytes, bytes, int, int]:
    """Concatenate file bytes into (train, held_out, n_train_files, n_held_out_files)."""
    held = [f for i, f in enumerate(files) if i % holdout_every == 0]
    train = [f for i, f in enumerate(files) if i % holdout_every != 0]
    return (
        b"".join(f.read_bytes() for f in train),
        b"".join(f.read_bytes() for f in held),
        len(train),
        len(held),
    )


def text_slice(data: bytes, start: int, size: int) -> str:
    """About ``size`` bytes of ``data`` from ``start``, cut at line boundaries and decoded as UTF-8."""
    start = data.index(b"\n", start) + 1 if start else 0
    end = data.rindex(b"\n", start, start + size) + 1
    return data[start:end].decode("utf-8", errors="replace")


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``total`` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def random_batch(data: Tensor, batch: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of ``seq_len`` inputs and their next-byte targets, each (B, T)."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()  # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


def make_optimizer(model: Llama, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm gains are left undecayed, as in nanoGPT)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp_path)`` then rename, so a crash never leaves a truncated artefact."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("passforge/models/data"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--holdout-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PRESETS["tiny"]
    T = cfg.max_seq_len

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_bytes, held_bytes, n_train, n_held = split_corpus(stdlib_files(stdlib), args.holdout_every)
    train_data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8)
    held_data = torch.frombuffer(bytearray(held_bytes), dtype=torch.uint8).long()
    eval_text = text_slice(held_bytes, 0, EVAL_TEXT_BYTES)
    calib_text = text_slice(train_bytes, len(train_bytes) // 2, CALIB_TEXT_BYTES)
    eval_ids = torch.tensor(list(eval_text.encode("utf-8")), dtype=torch.long)
    print(f"corpus: {stdlib}")
    print(f"train: {n_train} files, {len(train_bytes)} B; held-out: {n_held} files, {len(held_bytes)} B")

    model = build(cfg, seed=args.seed)
    print(f"model: tiny preset, {model.num_params()} params")
    opt = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)

    def held_out_ppl(ids: Tensor, max_windows: int | None) -> float:
        model.eval()
        ppl = perplexity(model, ids, seq_len=T, batch_size=args.batch_size, max_windows=max_windows)
        model.train()
        return ppl

    t0 = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0)
    for step in bar:
        lr = lr_at(step, lr=args.lr, warmup=args.warmup, total=args.steps, min_lr=args.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = random_batch(train_data, args.batch_size, T, gen)  # (B, T) each
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if (step + 1) % args.eval_every == 0:
            ppl = held_out_ppl(held_data, args.eval_windows)
            tqdm.write(f"step {step + 1}: train loss {loss.item():.4f}, held-out ppl {ppl:.3f}")
    train_s = time.time() - t0

    model.eval()
    final_ppl = held_out_ppl(eval_ids, None)
    print(
        f"done: {args.steps} steps in {train_s:.0f}s; held-out ppl on eval.txt (seq_len {T}): {final_ppl:.3f}"
    )

    meta = {
        "preset": "tiny",
        "config": asdict(cfg),
        "num_params": model.num_params(),
        "tokenizer": "byte-level (UTF-8 bytes, vocab 256)",
        "corpus": {
            "description": "Python standard library .py source (site-packages excluded), PSF licence",
            "python_version": platform.python_version(),
            "files_sorted_by": "path relative to the stdlib root",
            "holdout": f"every {args.holdout_every}th file (index % {args.holdout_every} == 0)",
            "train_files": n_train,
            "held_out_files": n_held,
            "train_bytes": len(train_bytes),
            "held_out_bytes": len(held_bytes),
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": T,
            "seed": args.seed,
            "optimizer": "AdamW(betas=(0.9, 0.95))",
            "lr": args.lr,
            "min_lr": args.min_lr,
            "warmup_steps": args.warmup,
            "schedule": "linear warmup + cosine decay",
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "threads": args.threads,
            "wall_time_s": round(train_s, 1),
            "machine": f"{platform.machine()} CPU, {args.threads} threads",
            "torch_version": torch.__version__,
        },
        "heldout_perplexity": {"text": "eval.txt", "seq_len": T, "value": round(final_ppl, 4)},
        "reproduce": "python -m passforge.models.train_tiny "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(
        args.out / "tiny_lm.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"})
    )
    atomic_write(args.out / "tiny_lm.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    atomic_write(args.out / "eval.txt", lambda p: p.write_text(eval_text, encoding="utf-8"))
    atomic_write(args.out / "calib.txt", lambda p: p.write_text(calib_text, encoding="utf-8"))
    print(f"wrote {args.out}/tiny_lm.safetensors, tiny_lm.json, eval.txt, calib.txt")


if __name__ == "__main__":
    main()
