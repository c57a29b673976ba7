"""The "touch every byte once" floor: read every input byte, write as many output bytes, nothing else.

    python tools/bench/floor.py OUT_FILE N_BYTES INPUT...

Reads each input with ``readinto`` into one reused buffer and sums it as uint64 words (so every byte
really reaches the CPU), then writes ``N_BYTES`` to ``OUT_FILE`` from that buffer in the same chunks and
deletes it. Any pass that must read its inputs and write its output cannot beat this by much on the same
machine and page-cache state; issue 6 asks every pass to stay within 2x of it.
"""
from __future__ import annotations

import os
import sys

import numpy as np

CHUNK = 16 << 20


def main() -> int:
    out, n_out, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    words = np.frombuffer(buf, dtype=np.uint64)
    acc = np.uint64(0)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                acc += words[: n // 8].sum(dtype=np.uint64)
    with open(out, "wb", buffering=0) as f:
        left = n_out
        while left > 0:
            k = min(left, CHUNK)
            f.write(view[:k])
            left -= k
    os.unlink(out)
    print(f"checksum {int(acc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
