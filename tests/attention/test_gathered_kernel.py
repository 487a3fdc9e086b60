"""The native kernel's gathered blocks (`window_gathered_forward/backward`) against the PyTorch path's blocks.

fused_chunks hands the native kernel the rows, the indices of each block's
queries and extended rows, and the mask's recipe; the PyTorch path gathers the
rows (`_block_rows`), builds the mask (`MaskRecipe.block`) and calls the dense
block kernel. Every plan kind is covered: sorted (LSH: shared query-keys, the
self value on the diagonal or by position) and in position order (local
attention; sliding windows with a band), causal or not, with padding, wrap and
wider windows.
"""

from __future__ import annotations

import pytest
import torch

from reformer.attention import fused_chunks, native, window_kernel
from reformer.attention.chunking import add_normalize_keys_backward_, padded_mask
from tests.conftest import assert_close, seeded, tile_products


@pytest.fixture(autouse=True)
def needs_native():
    if native.library() is None:
        pytest.skip("the native kernel is unavailable here (no C++ compiler, or REFORMER_NATIVE=0)")


@pytest.fixture(params=["tile", "blas"])
def products(request):
    """The kernel's chunk products: its own tiles, or the BLAS's."""
    with tile_products(request.param == "tile"):
        yield request.param


# (name, options): plans as lsh, local and sliding attention build them
PLANS = [
    ("lsh causal", dict(rounds=3, causal=True, self_on_diagonal=True)),
    ("lsh", dict(rounds=2, causal=False, self_on_diagonal=True)),
    ("lsh wrap", dict(rounds=2, causal=True, wrap=True, self_on_diagonal=False)),
    ("lsh wide window", dict(rounds=2, causal=False, window=(2, 1), self_on_diagonal=True)),
    ("local causal", dict(in_position_order=True, causal=True, self_value=None)),
    ("local", dict(in_position_order=True, causal=False, window=(1, 1), self_value=None)),
    ("sliding causal band", dict(in_position_order=True, causal=True, band=5, self_value=None)),
    ("sliding band", dict(in_position_order=True, causal=False, window=(1, 1), band=4, self_value=None)),
]


def make_plan(dtype, *, n=21, c=4, b=2, h=3, rounds=1, causal=True, wrap=False, window=(1, 0), band=None,
              self_value=-1e5, self_on_diagonal=False, in_position_order=False, seed=0):
    """A plan over a padded batch (the second sequence has 5 padded tokens) and its rows."""
    gen = seeded(seed)
    n_pad = -(-n // c) * c
    mask = padded_mask(torch.arange(n)[None].expand(b, n) < torch.tensor([[n], [n - 5]]), b, n, n_pad, "cpu")
    if in_position_order:
        flat_order = torch.arange(n_pad).expand(b, h, n_pad)
    else:
        flat_order = torch.stack([torch.randperm(n_pad, generator=gen) for _ in range(b * h * rounds)])
        flat_order = flat_order.view(b, h, rounds * n_pad)
    plan = fused_chunks.chunk_plan(flat_order, mask, n_pad, c, causal, wrap, window, dtype, scale=0.41,
                                   self_value=self_value, self_on_diagonal=self_on_diagonal,
                                   in_position_order=in_position_order, band=band)
    rows = [torch.randn(plan.n_rows, 5, dtype=dtype, generator=gen) for _ in range(3)]
    return plan, rows


def each_block(plan):
    bh, g, c = plan.rows.shape
    w = plan.recipe.k_pos.shape[-1]
    for row in range(bh):
        for start, end in fused_chunks.blocks(g, c, w):
            yield row, start, end


@pytest.mark.parametrize("name, options", PLANS, ids=[name for name, _ in PLANS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_native_mask_is_the_recipes_bit_for_bit(name, options, dtype):
    plan, _ = make_plan(dtype, **options)
    masked = 0
    for row, start, end in each_block(plan):
        expected = plan.recipe.block(row, start, end)[0]
        got = window_kernel.native_block_mask(plan.recipe.native_block(row, start, end), dtype)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (row, start)
        masked += int((expected < -1e6).sum())
    assert masked > 0  # the plans do mask something


@pytest.mark.parametrize("name, options", PLANS, ids=[name for name, _ in PLANS])
def test_gathered_forward_equals_the_dense_block_on_gathered_rows(name, options, products):
    plan, (q_rows, k_rows, v_rows) = make_plan(torch.float64, **options)
    k_rows = None if plan.rank is not None else k_rows  # sorted plans: shared query-keys, as LSH
    c, d = plan.rows.shape[2], q_rows.shape[1]
    for row, start, end in each_block(plan):
        q, k, v, _ = fused_chunks._block_rows(plan, row, start, end, q_rows, k_rows, v_rows)
        expected_out, expected_lse = window_kernel._FLASH(
            q[None], *(window_kernel.windows(x[None], end - start, c, plan.recipe.k_pos.shape[-1]) for x in (k, v)),
            0.0, False, attn_mask=plan.recipe.block(row, start, end), scale=plan.scale)
        block = fused_chunks._gathered_block(plan, row, start, end, q_rows, k_rows, v_rows)
        out, lse = torch.full(((end - start) * c, d), float("nan"), dtype=torch.float64), q.new_empty(end - start, c)
        window_kernel.gathered_block_forward(block, out, None, lse)
        assert_close(out.view(-1, c, d), expected_out[0], 1e-12, f"out {row} {start}")
        assert_close(lse, expected_lse[0], 1e-12, f"lse {row} {start}")
        if plan.rank is None:  # position order: each row once, so the outputs can go to the rows by index
            scattered = torch.zeros_like(q_rows)
            window_kernel.gathered_block_forward(block, scattered, block.q_index, lse)
            assert torch.equal(scattered[block.q_index.reshape(-1)], out)


@pytest.mark.parametrize("name, options", PLANS, ids=[name for name, _ in PLANS])
@pytest.mark.parametrize("accumulate", [True, False])
def test_gathered_backward_equals_the_dense_block_and_adds_or_writes(name, options, accumulate, products):
    plan, (q_rows, k_rows, v_rows) = make_plan(torch.float64, **options)
    shared = plan.rank is not None
    k_rows = None if shared else k_rows
    c, d = plan.rows.shape[2], q_rows.shape[1]
    gen = seeded(5)
    for row, start, end in each_block(plan):
        q, k, v, raw = fused_chunks._block_rows(plan, row, start, end, q_rows, k_rows, v_rows)
        mask = plan.recipe.block(row, start, end)[0]
        _, lse = window_kernel.window_block_forward(q, k, v, mask, plan.scale)
        block = fused_chunks._gathered_block(plan, row, start, end, q_rows, k_rows, v_rows)
        index = block.q_index.reshape(-1)  # a row may come twice (once per round): dO, o, lse are per row
        grad_rows, out_rows = (torch.randn(q_rows.shape, dtype=torch.float64, generator=gen) for _ in range(2))
        lse_rows = torch.randn(q_rows.shape[0], dtype=torch.float64, generator=gen).abs_() + lse.max()
        share = torch.exp(lse.view(-1) - lse_rows[index])  # the round's share of the joint softmax
        expected = window_kernel.window_block_backward_batched(
            (grad_rows[index] * share[:, None]).view(q.shape), q, k, v, out_rows[index].view(q.shape), lse, mask,
            plan.scale)
        start_values = [torch.randn(rows, d, dtype=torch.float64, generator=gen)
                        for rows in ((end - start) * c, k.shape[0], v.shape[0])]  # what dq, dk, dv hold before
        dq, dk, dv = (x.clone() for x in start_values)
        window_kernel.gathered_block_backward(block, grad_rows, out_rows, lse, lse_rows, dq, None, accumulate, dk, dv,
                                              accumulate)
        base = [x if accumulate else torch.zeros_like(x) for x in start_values]
        assert_close(dq, base[0] + expected[0].view(-1, d), 1e-12, "dq")
        assert_close(dv, base[2] + expected[2], 1e-12, "dv")
        if shared:  # the key gradients go through the unit-length keys, and are always added
            expected_dk = start_values[1].clone()
            add_normalize_keys_backward_(expected_dk, raw, expected[1])
        else:
            expected_dk = base[1] + expected[1]
        assert_close(dk, expected_dk, 1e-12, "dk")


def test_gathered_backward_is_the_same_bit_for_bit_with_one_or_two_threads(products):
    plan, (q_rows, _, v_rows) = make_plan(torch.float32, n=64, c=8, rounds=4, self_on_diagonal=True)
    row, start, end = next(each_block(plan))
    block = fused_chunks._gathered_block(plan, row, start, end, q_rows, None, v_rows)
    g, c, d = (end - start), plan.rows.shape[2], q_rows.shape[1]
    out, lse = torch.empty(g * c, d), torch.empty(g, c)
    window_kernel.gathered_block_forward(block, out, None, lse)
    grad_rows = torch.randn(q_rows.shape, generator=seeded(2))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            dq, dk, dv = torch.zeros(g * c, d), torch.zeros(block.kv_index.shape[0], d), torch.zeros(
                block.kv_index.shape[0], d)
            out_rows = torch.zeros_like(q_rows)
            out_rows[block.q_index.reshape(-1)] = out
            window_kernel.gathered_block_backward(block, grad_rows, out_rows, lse, None, dq, None, True, dk, dv, True)
            results.append((dq, dk, dv))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_gathered_blocks_refuse_what_they_would_read_or_write_out_of_bounds():
    """Shapes and layouts are checked before the call; index values by the kernel as it reads them."""
    plan, (q_rows, _, v_rows) = make_plan(torch.float64)
    row, start, end = next(each_block(plan))
    block = fused_chunks._gathered_block(plan, row, start, end, q_rows, None, v_rows)
    g, c, d = end - start, plan.rows.shape[2], q_rows.shape[1]
    out, lse = torch.empty(g * c, d, dtype=torch.float64), torch.empty(g, c, dtype=torch.float64)
    bad_index = block.q_index.clone()
    bad_index[0, 0] = q_rows.shape[0]
    cases = [
        (dict(q_index=bad_index), (out, None, lse), "q_index and kv_index"),
        (dict(kv_index=block.kv_index[:-1]), (out, None, lse), "extended rows do not cover"),
        (dict(v_rows=v_rows.float()), (out, None, lse), "contiguous \\(N, d\\) tensors of one dtype"),
        (dict(mask=plan.recipe.native_block(row, start, end).__class__(
            **{**vars(block.mask), "k_pos": block.mask.k_pos.float()})), (out, None, lse), "contiguous float64"),
        ({}, (out[:-1], None, lse), "an output must be"),
        ({}, (out, None, lse[:-1]), "log-sum-exps"),
    ]
    negative = block.kv_index.clone()
    negative[-1] = -1
    far = block.q_index.clone()
    far[-1, -1] = q_rows.shape[0]  # a row the output does not have
    cases += [(dict(kv_index=negative), (out, None, lse), "q_index and kv_index"),
              ({}, (torch.empty_like(q_rows), far, lse), "q_index and kv_index")]
    for changes, outputs, message in cases:
        broken = window_kernel.GatheredBlock(**{**vars(block), **changes})
        with pytest.raises(ValueError, match=message):
            window_kernel.gathered_block_forward(broken, *outputs)
    extended = block.kv_index.shape[0]
    gradients = [torch.zeros_like(q_rows), far, False, *(torch.zeros(extended, d, dtype=torch.float64)
                                                          for _ in range(2)), True]
    with pytest.raises(ValueError, match="q_index and kv_index must be indices of rows they read"):  # dq_index
        window_kernel.gathered_block_backward(block, torch.zeros_like(q_rows), torch.zeros_like(q_rows), lse, None,
                                              *gradients)
