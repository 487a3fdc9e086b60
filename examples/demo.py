"""Train a small Reformer on Crime and Punishment, byte by byte, and sample from it.

Run with `make demo`. Uses ../shared/data/crime-and-punishment-2554.txt when it
is there (or the file given with --data), else this repository's own text.
Prints the held-out bits per byte before and after training, then a sample.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from reformer import ReformerConfig, ReformerLM
from reformer.config import default_axial_shape
from reformer.memory import release_freed_memory_eagerly

ROOT = Path(__file__).resolve().parents[1]
NOVEL = ROOT.parent / "shared" / "data" / "crime-and-punishment-2554.txt"


def load_text(path: str | None) -> tuple[bytes, str]:
    if path:
        return Path(path).read_bytes(), path
    if NOVEL.is_file():
        return NOVEL.read_bytes(), str(NOVEL)
    files = sorted(ROOT.glob("src/**/*.py")) + sorted(ROOT.glob("*.md"))
    return b"\n".join(f.read_bytes() for f in files), "this repository's source"


def windows(data: torch.Tensor, length: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length, (batch,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def bits_per_byte(model: ReformerLM, data: torch.Tensor, length: int, n_windows: int = 8) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = [model(ids, labels=ids).loss.item() for ids in windows(data, length, n_windows, gen).split(1)]
    model.train()
    return sum(losses) / len(losses) / math.log(2)


@torch.no_grad()
def sample(model: ReformerLM, prompt: bytes, n_new: int, temperature: float, gen: torch.Generator) -> bytes:
    """Plain sampling by recomputing the whole prefix each step (cached generation is a later feature)."""
    model.eval()
    ids = torch.tensor(list(prompt))[None]
    for _ in range(n_new):
        logits = model(ids[:, -model.config.max_seq_len:]).logits[0, -1] / temperature
        next_id = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, next_id[None]], dim=1)
    return bytes(ids[0, len(prompt):].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a text file (any bytes); default: Crime and Punishment if present")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the data order")
    args = parser.parse_args()
    release_freed_memory_eagerly()

    text, source = load_text(args.data)
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.95 * len(data))
    train, valid = data[:split], data[split:]
    print(f"data: {source}, {len(data):,} bytes ({len(train):,} train / {len(valid):,} held out)")

    config = ReformerConfig(
        vocab_size=256, d_model=128, n_heads=2, d_head=64, d_ff=256, attn_layers=("local", "lsh") * 2,
        lsh_chunk_size=64, local_chunk_size=64, n_hashes=2, axial_shape=default_axial_shape(args.seq_len),
        axial_dims=(32, 96), max_seq_len=args.seq_len, ff_chunk_size=512, seed=args.seed,
    )
    model = ReformerLM(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, layers {config.attn_layers}, reversible")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"held-out bits per byte before training: {bits_per_byte(model, valid, args.seq_len):.3f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = windows(train, args.seq_len, args.batch_size, gen)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            tokens_per_s = step * args.batch_size * args.seq_len / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss.item():.3f}  bits/byte {loss.item() / math.log(2):.3f}  "
                  f"{tokens_per_s:,.0f} tokens/s")
    print(f"held-out bits per byte after {args.steps} steps: {bits_per_byte(model, valid, args.seq_len):.3f}")
    print("sample:", sample(model, b"He ", 200, 0.8, gen).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
