"""Reusable tensor buffers, so a large temporary is not faulted into memory afresh for every tensor.

Every layer of a model has the shapes of the one before, so the buffers one output tensor needed (its
cached inputs, its stage values, the output itself) are exactly the ones the next tensor needs. A fresh
allocation of tens of megabytes is a new memory mapping that the kernel fills 4 KiB page by page; taken
back from this pool it costs nothing. At most ``idle_limit`` bytes wait here unused; buffers are shared
between threads (one is taken by a worker and given back by the writer).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch


class BufferPool:
    def __init__(self, idle_limit: int = 128 << 20) -> None:
        self.idle_limit = int(idle_limit)
        self._free: dict[int, list[int]] = {}             # size → ids of idle buffers, newest last
        self._idle: OrderedDict[int, torch.Tensor] = OrderedDict()  # id → idle buffer, oldest first
        self._idle_bytes = 0
        self._lent: dict[int, torch.Tensor] = {}          # data pointer → the byte buffer behind a lent tensor
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype``; give it back with :meth:`give`."""
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if n == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        buf = None
        with self._lock:
            ids = self._free.get(n)
            if ids:
                buf = self._idle.pop(ids.pop())
                self._idle_bytes -= n
        if buf is None:
            buf = torch.empty(n, dtype=torch.uint8)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
        return buf.view(dtype).view(tuple(shape))

    def give(self, t: torch.Tensor) -> None:
        """Return a tensor made by :meth:`empty`; the caller keeps no other reference to its memory.
        Anything else is ignored. The buffers idle longest are dropped first when over the limit."""
        with self._lock:
            buf = self._lent.pop(t.data_ptr(), None)
            if buf is None or buf.numel() > self.idle_limit:
                return
            self._idle[id(buf)] = buf
            self._free.setdefault(buf.numel(), []).append(id(buf))
            self._idle_bytes += buf.numel()
            while self._idle_bytes > self.idle_limit:
                key, old = self._idle.popitem(last=False)
                self._free[old.numel()].remove(key)
                self._idle_bytes -= old.numel()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._idle.clear()
            self._idle_bytes = 0


#: the process's pool (the evaluator's caches and leaf reads, the build's output tensors)
POOL = BufferPool()
