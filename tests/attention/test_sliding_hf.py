"""sliding_window_attention against the peer that defines it: transformers' LongformerSelfAttention.

HF's layer projects its own q, k, v and q_g, k_g, v_g; here each of its six projections is replaced by one
that returns a given tensor, so that HF and we attend over the very same leaves and their gradients can be
compared: outputs and the gradients of all six, in float32 (1e-6) and float64 (1e-10), with padding and a
different number of global tokens in each batch row. HF is non-causal and undilated; its attention_window
is 2 * window.
"""

from __future__ import annotations

import pytest
import torch

from reformer.attention import sliding, sliding_window_attention
from reformer.attention.reference import sliding_window_reference
from tests.conftest import assert_close, seeded

transformers = pytest.importorskip("transformers")
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

HEADS, D_HEAD = 2, 8
WINDOWS = {2: 24, 3: 24, 5: 30}  # window: a length that is a multiple of HF's attention_window (HF fails at 1)
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-10}
PATHS = ["reference", "fused", "fused-pytorch", "explicit"]


def masks(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, n) real and global masks: rows with 3, 4 and 1 global tokens; no padding, right padding, a hole."""
    real = torch.ones(3, n, dtype=torch.bool)
    real[1, -5:] = False
    real[2, 3:5] = False
    glob = torch.zeros(3, n, dtype=torch.bool)
    glob[0, [0, 7, 13]] = True
    glob[1, [2, 10, 11, 17]] = True
    glob[2, [n - 1]] = True
    return real, glob


class Given(torch.nn.Module):
    """Stands in for one of HF's projections: returns a given tensor, whatever it is applied to."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output.clone()  # HF scales its queries in place


def hf_attention(window: int, leaves: list[torch.Tensor], real: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """HF's LongformerSelfAttention over the given q, k, v, q_g, k_g, v_g (b, n, h * d): (b, n, h * d)."""
    q, k, v, q_g, k_g, v_g = leaves
    b, n, width = q.shape
    config = transformers.LongformerConfig(hidden_size=width, num_attention_heads=HEADS,
                                           attention_window=[2 * window], attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():  # its Linear layers draw their (replaced) init from the global RNG
        layer = LongformerSelfAttention(config, layer_id=0).to(q.dtype)
    sequence_first = [x.transpose(0, 1) for x in (q, k, v, k_g, v_g)]  # (n, b, h * d), as HF projects
    layer.query, layer.key, layer.value, layer.key_global, layer.value_global = map(Given, sequence_first)
    count = int(glob.sum(1).max())
    global_queries = torch.stack([torch.cat([q_g[row, glob[row]], q_g.new_zeros(count - int(glob[row].sum()), width)])
                                  for row in range(b)], dim=1)  # (G, b, h * d): each row's globals in order
    layer.query_global = Given(global_queries)
    mask = torch.zeros(b, n, dtype=q.dtype).masked_fill(~real, -10000.0).masked_fill(glob, 10000.0)
    hidden = q.new_zeros(b, n, width)
    return layer(hidden, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                 is_global_attn=True)[0]


def ours(path: str, window: int, leaves: list[torch.Tensor], real, glob, monkeypatch) -> torch.Tensor:
    b, n, width = leaves[0].shape
    q, k, v, q_g, k_g, v_g = (x.view(b, n, HEADS, D_HEAD).transpose(1, 2) for x in leaves)  # (b, h, n, d)
    options = dict(window=window, attention_mask=real, global_mask=glob, global_qkv=(q_g, k_g, v_g))
    if path == "reference":
        out = sliding_window_reference(q, k, v, **options)
    else:
        if path == "explicit":
            monkeypatch.setattr(sliding, "fused_kernel_available", lambda *_: False)
        elif path == "fused-pytorch":
            monkeypatch.setenv("REFORMER_BACKEND", "torch")
        out = sliding_window_attention(q, k, v, **options)
    return out.transpose(1, 2).reshape(b, n, width)


def float64_softmax(monkeypatch) -> None:
    """HF rounds its probabilities to float32 (`softmax(..., dtype=torch.float32)`, then back); in float64 the
    comparison keeps them in float64, and changes nothing else."""
    softmax = torch.nn.functional.softmax

    def keep_float64(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64 and dtype == torch.float32:
            dtype = None
        return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", keep_float64)


def hf_result(window, leaves, real, glob, weights, monkeypatch, exact: bool) -> list[torch.Tensor]:
    """HF's output and the gradients of the six leaves; exact: in float64 (from the leaves' values)."""
    if exact:
        leaves = [x.detach().double().requires_grad_() for x in leaves]
        weights = weights.double()
        float64_softmax(monkeypatch)
    out = hf_attention(window, leaves, real, glob)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    monkeypatch.undo()
    return [out, *grads]


NAMES = ["out", "grad q", "grad k", "grad v", "grad q_g", "grad k_g", "grad v_g"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", sorted(WINDOWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_matches_transformers_longformer(monkeypatch, dtype, window, path):
    """Output and the gradients of q, k, v, q_g, k_g, v_g equal HF's LongformerSelfAttention's (entries up to 3).

    float64: to 1e-10. float32: to 1e-6 of HF's exact result on the same float32 leaves (HF's float64 run), and to
    1e-6 of HF's float32 result relative to each tensor's largest entry (the two float32 roundings differ by up
    to 1.1e-6 absolute: HF's own float32 result is up to 7.7e-7 from its exact one on these inputs).
    """
    n = WINDOWS[window]
    real, glob = masks(n)
    gen = seeded(window)
    leaves = [torch.randn(3, n, HEADS * D_HEAD, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
              for _ in range(6)]
    weights = torch.randn(3, n, HEADS * D_HEAD, generator=gen, dtype=torch.float64).to(dtype)
    exact = hf_result(window, leaves, real, glob, weights, monkeypatch, exact=True)
    rounded = hf_result(window, leaves, real, glob, weights, monkeypatch, exact=False) if dtype != torch.float64 else []
    out = ours(path, window, leaves, real, glob, monkeypatch)
    results = [out, *torch.autograd.grad((out * weights).sum(), leaves)]
    for name, result, expected in zip(NAMES, results, exact):
        assert_close(result.double(), expected, TOLERANCE[dtype], f"{name} against HF in float64")
    for name, result, expected in zip(NAMES, results, rounded):
        assert_close(result, expected, 1e-6 * float(expected.detach().abs().max()), f"{name} against HF in float32")


def test_global_projections_change_what_non_global_queries_see_only_through_global_rows():
    """Longformer's rule, seen from HF: changing k_g and v_g away from the global tokens' own rows moves only the
    global tokens' outputs; the old rule (global_kv) would move every query that sees a global key."""
    real, glob = masks(24)
    gen = seeded(3)
    leaves = [torch.randn(3, 24, HEADS * D_HEAD, generator=gen, dtype=torch.float64) for _ in range(6)]
    moved = [x.clone() for x in leaves]
    moved[4] += 1.0  # k_g
    moved[5] -= 1.0  # v_g
    before, after = (hf_attention(3, x, real, glob) for x in (leaves, moved))
    changed = (before - after).abs().amax(-1) > 0  # (b, n)
    assert torch.equal(changed, glob)
