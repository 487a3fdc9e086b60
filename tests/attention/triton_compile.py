"""Compile the Triton kernels for NVIDIA GPUs without one: Triton's own compiler down to a cubin (its bundled
ptxas), for a given architecture, the way they are launched (`triton_chunks._Launch`).

    python tests/attention/triton_compile.py 80 90     # prints one JSON line per (kernel, dtype, arch)

Run by tests/attention/test_triton_compile.py in a process of its own: TRITON_INTERPRET must be unset when
Triton loads, or the kernels are the interpreter's.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from reformer.attention import triton_chunks  # noqa: E402

SCALARS = dict(scale="fp32", band="fp32", diagonal="i32", self_value="fp32", masked_value="fp32", blocked="fp32",
               c="i32", w="i32", e="i32", g="i32", d="i32", q_blocks="i32")
KERNELS = {"forward": triton_chunks._forward_kernel, "dq": triton_chunks._dq_kernel,
           "dkdv": triton_chunks._dkdv_kernel}
# (rows, positions, tile, flags): what the tests and the benchmarks launch, small tiles for float32 (an IEEE
# float32 product of 64 x 64 tiles takes ~10 s per kernel to compile)
VARIANTS = [("bf16", "fp32", 64, dict(CAUSAL=True, HAS_BAND=False, SELF_MODE=1, HAS_SHARE=True)),
            ("fp16", "fp64", 64, dict(CAUSAL=False, HAS_BAND=True, SELF_MODE=0, HAS_SHARE=False)),
            ("fp32", "fp32", 16, dict(CAUSAL=False, HAS_BAND=False, SELF_MODE=2, HAS_SHARE=True))]
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def compile_kernel(name: str, rows: str, positions: str, tile: int, flags: dict, arch: int):
    kernel = KERNELS[name]
    pointers = dict(Q=rows, K=rows, V=rows, DO=rows, OUT=rows, ROWS="i64", KV="i64", QP=positions, KP=positions,
                    LSE="fp32", SHARE="fp32", DELTA="fp32", DQ="fp32", DK="fp32", DV="fp32")
    constants = dict(flags, BQ=tile, BK=tile, BD=tile, DOT=DTYPES[rows], PRECISION="ieee")
    constants = {key: value for key, value in constants.items() if key in kernel.arg_names}
    signature = {arg: "constexpr" if arg in constants else f"*{pointers[arg]}" if arg in pointers else SCALARS[arg]
                 for arg in kernel.arg_names}
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": triton_chunks.NUM_WARPS, "enable_fp_fusion": False})
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=target, options=options.__dict__)


def main(arches: list[int]) -> None:
    for arch in arches:
        for rows, positions, tile, flags in VARIANTS:
            for name in KERNELS:
                start = time.perf_counter()
                compiled = compile_kernel(name, rows, positions, tile, flags, arch)
                print(json.dumps({"kernel": name, "rows": rows, "arch": arch, "cubin_bytes": len(compiled.asm["cubin"]),
                                  "shared_bytes": compiled.metadata.shared,
                                  "seconds": round(time.perf_counter() - start, 2)}), flush=True)


if __name__ == "__main__":
    main([int(arch) for arch in sys.argv[1:]] or [90])
