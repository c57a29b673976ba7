"""llama.cpp's quantizer (``llama_model_quantize`` from llama-cpp-python), as llama-quantize runs it.

    python tools/bench/llama_quantize.py IN.gguf OUT.gguf Q4_K_M [--nthread 2]

Default parameters (no imatrix, output/embedding types chosen by llama.cpp's own policy), like
``llama-quantize IN OUT Q4_K_M 2``.
"""
from __future__ import annotations

import argparse
import sys

FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_K_S": 14, "Q5_K_S": 16, "BF16": 32}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("type", choices=sorted(FTYPES))
    ap.add_argument("--nthread", type=int, default=2)
    a = ap.parse_args()
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = a.nthread
    params.ftype = FTYPES[a.type]
    rc = llama_cpp.llama_model_quantize(a.input.encode(), a.output.encode(), params)
    if rc != 0:
        print(f"llama_model_quantize failed with {rc}", file=sys.stderr)
    return int(rc != 0)


if __name__ == "__main__":
    sys.exit(main())
