"""The supervised-positions loss equals the model's own full loss, in value and gradients."""

import torch

from chattune.data.collate import flat_collate, padded_collate
from chattune.data.render import IGNORE
from chattune.train.loss import supervised_loss, supervised_positions


def features(vocab):
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in [(12, 5), (7, 3), (20, 15)]:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_positions_and_targets_line_up():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE, 9]])
    keep, targets = supervised_positions(labels)
    assert keep.tolist() == [[False, True, True, False, True, False]]
    assert targets.tolist() == [7, 8, 9]


def test_loss_and_gradients_equal_the_full_computation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    for collate in (flat_collate(), padded_collate(0)):
        batch = collate(features(model.config.vocab_size))
        model.zero_grad()
        ours, _ = supervised_loss(model, batch, None)
        ours.backward()
        ours_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
        model.zero_grad()
        full = model(**batch).loss
        full.backward()
        torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_grad, model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-6, rtol=1e-4)
        # With num_items (gradient accumulation), the sum is divided by the whole accumulated count.
        n = sum(l != IGNORE for f in features(model.config.vocab_size) for l in f["labels"][1:])
        scaled, _ = supervised_loss(model, batch, 2 * n)
        torch.testing.assert_close(scaled, full.detach() / 2, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_equals_float32_cross_entropy(monkeypatch):
    """bf16 logits: same loss and same logit gradients as F.cross_entropy(logits.float()), chunk edges included."""
    import torch.nn.functional as F

    from chattune.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ROWS", 7)  # 30 rows: four full chunks and a partial one
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(30, 301, generator=g) * 4).bfloat16()
    targets = torch.randint(0, 301, (30,), generator=g)
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours = loss_mod.chunked_cross_entropy(ours_in, targets)
    ref = F.cross_entropy(ref_in.float(), targets, reduction="sum")
    (ours * 0.5).backward()
    (ref * 0.5).backward()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=0, rtol=0)
