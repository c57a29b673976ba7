"""Importance matrices: per input column of every quantizable matmul, the mean squared activation.

``files`` reads and writes llama.cpp's imatrix files (the GGUF format ``llama-imatrix`` writes by
default, and the legacy ``.dat`` format) and turns them into the per-column weights llama-quantize
hands to the quantizers.
"""
