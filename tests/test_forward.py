"""The layer-wise forward pass against transformers' whole model, and the imatrix collector's sums against
activations transformers itself computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ggmerge.forward import LayerwiseModel
from ggmerge.sources import open_source


def _full_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(tokens).logits


@pytest.mark.parametrize("fixture", ["tiny_mistral", "tiny_mistral_tied"])
def test_layerwise_logits_equal_the_whole_model(fixture, request):
    folder = request.getfixturevalue(fixture)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(3, 32000, (5, 48)))
    ref = _full_logits(folder, tokens)
    # groups of 2 chunks: every layer is loaded three times
    lm = LayerwiseModel(open_source(folder), max_activation_bytes=2 * 48 * 64 * 4)
    assert lm.group_size(48) == 2
    got = {}
    lm.run(tokens, head_rows=slice(24, 47), on_logits=lambda i, x: got.__setitem__(i, x))
    assert sorted(got) == [0, 1, 2, 3, 4]
    for i in range(5):
        torch.testing.assert_close(got[i], ref[i, 24:47], rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_no_layer_stays_in_memory(tiny_mistral):
    lm = LayerwiseModel(open_source(tiny_mistral))
    lm.run(torch.zeros(1, 8, dtype=torch.long), head_rows=slice(4, 7), on_logits=lambda i, x: None)
    on_cpu = [n for n, p in lm._model.named_parameters() if p.device.type != "meta"]
    assert on_cpu == []


def test_collector_sums_what_transformers_feeds_each_linear(tiny_mistral):
    """Per input column Σx² and row counts of every decoder matmul, under GGUF names, against forward
    pre-hooks on transformers' own whole model."""
    from transformers import AutoModelForCausalLM

    from ggmerge.calibration import make_chunks
    from ggmerge.imatrix.collect import collect

    ids = np.random.default_rng(1).integers(3, 32000, 4 * 32).tolist()
    ch = make_chunks(ids, ctx=32, chunks=None, add_bos=True, bos=1)
    col = collect(open_source(tiny_mistral), ch)

    m = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()
    want: dict[str, torch.Tensor] = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            mod.register_forward_pre_hook(lambda _m, a, _n=name: want.__setitem__(
                _n, want.get(_n, 0) + (a[0].double() ** 2).reshape(-1, a[0].shape[-1]).sum(0)))
    with torch.no_grad():
        m(torch.from_numpy(ch.tokens))
    from ggmerge.arch.llama import hf_to_gguf

    assert set(col.sums) == {hf_to_gguf(n + ".weight") for n in want}
    assert len(col.sums) == 2 * 7
    for n, w in want.items():
        g = hf_to_gguf(n + ".weight")
        assert col.counts[g] == 4 * 32
        torch.testing.assert_close(col.sums[g], w, rtol=1e-5, atol=0)
