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


def test_gpu_chunks_are_large_and_give_the_same_loss_and_gradients(monkeypatch):
    """The chunk a GPU gets (chunk_rows(vocab, "cuda")), computed here on a CPU: the same gradient bit for bit as
    64-row chunks (a row's arithmetic does not depend on its chunk); against F.cross_entropy(logits.float()) the loss
    agrees to float32 summation order (1e-5 relative) and the bf16 gradient to one bf16 rounding step (2^-7
    relative: 4 of 210,700 entries land on the neighbouring bf16 value, from lse-vs-max-shift float32 rounding)."""
    import torch.nn.functional as F

    from chattune.train import loss as loss_mod

    assert loss_mod.chunk_rows(151_936, "cpu") == 64
    assert loss_mod.chunk_rows(151_936, "cuda") == 441  # 256 MiB of float32 per chunk
    assert loss_mod.chunk_rows(32_000, "cuda") == 2097 and loss_mod.chunk_rows(10**7, "cuda") == 256
    monkeypatch.setattr(loss_mod, "GPU_CHUNK_BYTES", 4 * 301 * 300)  # 300 rows per chunk at this vocabulary
    assert loss_mod.chunk_rows(301, "cuda") == 300
    gpu_rows = loss_mod.chunk_rows
    monkeypatch.setattr(loss_mod, "chunk_rows", lambda vocab, device: gpu_rows(vocab, "cuda"))
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(700, 301, generator=g) * 4).bfloat16()  # chunks of 300, 300, 100
    targets = torch.randint(0, 301, (700,), generator=g)
    ours_in, ref_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = loss_mod.chunked_cross_entropy(ours_in, targets)
    ref = F.cross_entropy(ref_in.float(), targets, reduction="sum")
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-5)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=0, rtol=2 ** -7)
    monkeypatch.setattr(loss_mod, "chunk_rows", lambda vocab, device: 64)  # the CPU's chunks
    cpu_in = logits.clone().requires_grad_(True)
    cpu = loss_mod.chunked_cross_entropy(cpu_in, targets)
    cpu.backward()
    torch.testing.assert_close(ours_in.grad, cpu_in.grad, atol=0, rtol=0)
    torch.testing.assert_close(ours, cpu, atol=0, rtol=1e-6)


def test_logits_reach_the_loss_in_the_models_dtype_under_mixed_precision(tiny_model_dir):
    """accelerate's mixed-precision wrapper converts every output to float32 (a full copy of the kept logits);
    keep_logits_dtype takes that off, autocast stays, and the loss and gradients are unchanged."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32
    from transformers import AutoModelForCausalLM

    from chattune.train import loss as loss_mod

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    # exactly what Accelerator.prepare_model does with mixed_precision=bf16
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)
    batch = flat_collate()(features(model.config.vocab_size))
    results = []
    for strip in (False, True):
        if strip:
            assert loss_mod.keep_logits_dtype(model) and not loss_mod.keep_logits_dtype(model)
        model.zero_grad()
        loss, out = supervised_loss(model, batch, None)
        loss.backward()
        results.append((out.logits.dtype, loss.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (dtype_a, loss_a, grad_a), (dtype_b, loss_b, grad_b) = results
    assert dtype_a == torch.float32 and dtype_b == torch.bfloat16
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    torch.testing.assert_close(grad_a, grad_b, atol=0, rtol=0)
