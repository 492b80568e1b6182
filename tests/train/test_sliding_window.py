"""Packed training honours each layer's sliding window: a long sample packed with a short one gets the same
logits and gradients as the same sample alone through the model's own attention (which applies the window).

Before the fix, model/packed_attention.py attended over the whole sample in every layer, so positions further
than the window from the start differed (issue #17, item 6).
"""

import pytest
import torch

from chattune.data.collate import flat_collate
from chattune.data.render import IGNORE

WINDOW = 8


def tiny_swa_model(family: str, attn: str = "sdpa"):
    """A random 3-layer model whose layers mix sliding-window (WINDOW) and full attention."""
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=0, **common))
    elif family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, **common))
    else:  # mistral: one window for every layer
        from transformers import MistralConfig, MistralForCausalLM

        common.pop("layer_types")
        model = MistralForCausalLM(MistralConfig(head_dim=8, **common))
    model.config._attn_implementation = attn
    model.set_attn_implementation(attn)
    model.config.use_cache = False
    return model.float().eval()


def packed_pair(vocab: int, lengths=(40, 6)):
    g = torch.Generator().manual_seed(1)
    feats = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
    return feats, flat_collate()(feats)


def logits_and_grads(model, ids, **kw):
    emb = model.get_input_embeddings()
    inputs = emb(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=inputs, **kw).logits
    logits.pow(2).mean(-1).sum().backward()
    return logits.detach()[0], inputs.grad[0]


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "mistral"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_packed_attention_keeps_the_sliding_window(family, grad, monkeypatch):
    from chattune.model import packed_attention as pa

    model = tiny_swa_model(family)
    feats, flat = packed_pair(model.config.vocab_size)
    n_long = len(feats[0]["input_ids"])
    alone_ids = torch.tensor([feats[0]["input_ids"]])
    short_ids = torch.tensor([feats[1]["input_ids"]])
    with torch.enable_grad() if grad else torch.no_grad():
        if grad:
            ref_long, ref_long_grad = logits_and_grads(model, alone_ids)
            ref_short, ref_short_grad = logits_and_grads(model, short_ids)
        else:
            ref_long, ref_short = model(alone_ids).logits[0], model(short_ids).logits[0]
        assert pa.use_packed_attention(model)
        kw = {k: flat[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        if grad:
            packed, packed_grad = logits_and_grads(model, flat["input_ids"], **kw)
        else:
            packed = model(flat["input_ids"], **kw).logits[0]
    torch.testing.assert_close(packed[:n_long], ref_long, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[n_long:], ref_short, atol=1e-5, rtol=1e-4)
    if grad:
        torch.testing.assert_close(packed_grad[:n_long], ref_long_grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed_grad[n_long:], ref_short_grad, atol=1e-5, rtol=1e-4)


def test_the_window_matters_here():
    """The test above would prove nothing if the window changed nothing: without it the long sample differs."""
    model = tiny_swa_model("qwen2")
    feats, _ = packed_pair(model.config.vocab_size)
    ids = torch.tensor([feats[0]["input_ids"]])
    with torch.no_grad():
        windowed = model(ids).logits[0]
        model.config.layer_types = ["full_attention"] * 3
        for layer in model.model.layers:
            layer.self_attn.sliding_window = None
        model.model.has_sliding_layers = False
        full = model(ids).logits[0]
    torch.testing.assert_close(windowed[:WINDOW], full[:WINDOW])
    assert (windowed[WINDOW:] - full[WINDOW:]).abs().max() > 1e-3


@pytest.mark.slow
def test_gemma3_270m_packed_equals_alone(gemma3_dir):
    """The issue's report: gemma3-270m (window 512), a 700-token sample packed with a short one."""
    from transformers import AutoModelForCausalLM

    from chattune.model.packed_attention import use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    assert model.config.sliding_window == 512
    feats, flat = packed_pair(model.config.vocab_size, lengths=(700, 20))
    with torch.no_grad():
        alone = model(torch.tensor([feats[0]["input_ids"]])).logits[0]
        use_packed_attention(model)
        kw = {k: flat[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        packed = model(flat["input_ids"], **kw).logits[0, :700]
    torch.testing.assert_close(packed, alone, atol=2e-3, rtol=1e-3)
