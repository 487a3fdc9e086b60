"""Compile the Triton kernels for NVIDIA GPUs without one: Triton's own compiler down to a cubin (its bundled
ptxas), for a given architecture, the way they are launched (`triton_chunks._Launch`).

    python tests/attention/triton_compile.py half 80 90     # one JSON line per (kernel, variant, arch)
    python tests/attention/triton_compile.py float32 80 90

Run by tests/attention/test_triton_compile.py in a process of its own: TRITON_INTERPRET must be unset when
Triton loads, or the kernels are the interpreter's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from reformer.attention import triton_chunks  # noqa: E402

SCALARS = dict(scale="fp32", band="fp32", diagonal="i32", self_value="fp32", masked_value="fp32", blocked="fp32",
               c="i32", w="i32", e="i32", g="i32", d="i32", q_blocks="i32")
KERNELS = {"forward": triton_chunks._forward_kernel, "dq": triton_chunks._dq_kernel,
           "dkdv": triton_chunks._dkdv_kernel}
# (rows, positions, (c, w, d), flags): shapes the model launches, at the tiles `triton_chunks.tiles` picks for
# them, with int32 offsets (NARROW); "float32" is its own set (its IEEE float32 products compile slowly)
VARIANTS = {
    "half": [("bf16", "fp32", (64, 128, 64), dict(CAUSAL=True, HAS_BAND=False, SELF_MODE=1, HAS_SHARE=True)),
             ("bf16", "fp32", (64, 128, 128), dict(CAUSAL=True, HAS_BAND=False, SELF_MODE=1, HAS_SHARE=True)),
             ("fp16", "fp64", (64, 192, 64), dict(CAUSAL=False, HAS_BAND=True, SELF_MODE=0, HAS_SHARE=False))],
    "float32": [("fp32", "fp32", (64, 128, 64), dict(CAUSAL=False, HAS_BAND=False, SELF_MODE=2, HAS_SHARE=True)),
                ("fp32", "fp32", (32, 96, 128), dict(CAUSAL=True, HAS_BAND=True, SELF_MODE=0, HAS_SHARE=False))],
}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compile_kernel(name: str, rows: str, positions: str, shape: tuple[int, int, int], flags: dict, arch: int):
    kernel = KERNELS[name]
    pointers = dict(Q=rows, K=rows, V=rows, DO=rows, OUT=rows, ROWS="i64", KV="i64", QP=positions, KP=positions,
                    LSE="fp32", SHARE="fp32", DELTA="fp32", DQ="fp32", DK="fp32", DV="fp32")
    tiles = triton_chunks.tiles(*shape, TORCH_DTYPES[rows], name)
    constants = dict(flags, BQ=tiles["BQ"], BK=tiles["BK"], BD=tiles["BD"], DOT=DTYPES[rows], PRECISION="ieee",
                     NARROW=True)
    constants = {key: value for key, value in constants.items() if key in kernel.arg_names}
    signature = {arg: "constexpr" if arg in constants else f"*{pointers[arg]}" if arg in pointers else SCALARS[arg]
                 for arg in kernel.arg_names}
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": tiles["num_warps"], "enable_fp_fusion": False})
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=target, options=options.__dict__)


def resources(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (spills) of a cubin's kernel, from Triton's bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(usage[1]), "stack_bytes": int(usage[2])}


def main(variants: str, arches: list[int]) -> None:
    for arch in arches:
        for rows, positions, shape, flags in VARIANTS[variants]:
            for name in KERNELS:
                start = time.perf_counter()
                compiled = compile_kernel(name, rows, positions, shape, flags, arch)
                print(json.dumps({"kernel": name, "rows": rows, "shape": shape, "arch": arch,
                                  "cubin_bytes": len(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared,
                                  **resources(compiled.asm["cubin"]),
                                  "seconds": round(time.perf_counter() - start, 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(arch) for arch in sys.argv[2:]] or [90])
