"""Graph breaks of `torch.compile(model)` on a whole ReformerLM (what `--compile` avoids), by reason and line.

`--compile` compiles only the position-wise parts (see `reformer.compile`,
and benchmarks/compile.py for their graph breaks: none). This script runs
`torch._dynamo.explain` over a whole small reversible model (LSH, local and
LSH layers, a training forward with labels) and counts the break reasons by
the source line they name.

    python benchmarks/compile_breaks.py     # writes benchmarks/results/compile_breaks.md
"""

from __future__ import annotations

import collections
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from reformer import ReformerConfig, ReformerLM

    config = ReformerConfig(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64,
                            attn_layers=("lsh", "local", "lsh"), lsh_chunk_size=16, local_chunk_size=16, n_hashes=2,
                            axial_shape=(8, 16), axial_dims=(8, 24), max_seq_len=128, reversible=True, seed=0)
    model = ReformerLM(config).train()
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(ids, labels=ids)
    counts: collections.Counter = collections.Counter()
    for reason in explained.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"`{frame.filename.split('src/')[-1]}:{frame.lineno}` `{frame.name}`" if frame else "(no source line)"
        counts[(reason.reason.splitlines()[0][:100], where)] += 1
    rows = ["| breaks | reason | where |", "|---:|---|---|",
            *(f"| {n} | {reason} | {where} |" for (reason, where), n in counts.most_common())]
    text = ["# Graph breaks of torch.compile over the whole model\n",
            f"Command: `python benchmarks/compile_breaks.py`. {datetime.date.today()}, torch {torch.__version__}.\n",
            "Model: 3 reversible layers (LSH, local, LSH), d_model 32, 2 heads x 16, chunks of 16, 2 hashes; "
            f"a training forward with labels on 2 x 96 tokens. `torch._dynamo.explain`: "
            f"**{explained.graph_count} graphs, {explained.graph_break_count} graph breaks**; "
            f"{len(explained.break_reasons)} break reasons:\n", *rows]
    out = ROOT / "benchmarks" / "results" / "compile_breaks.md"
    out.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
