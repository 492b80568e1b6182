"""Padding-free batches are exact: same logits and loss as padded batches, no cross-sample attention."""

import torch

from chattune.data.collate import flat_collate, padded_collate
from chattune.data.render import IGNORE


def features(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 2) + ids[n // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def load(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # what training sets; needed for exact packed boundaries
    return model.eval()


def test_flattened_logits_equal_per_sequence_logits(tiny_model_dir):
    for attn in ("sdpa", "eager"):
        model = load(tiny_model_dir, attn)
        feats = features([7, 12, 5], model.config.vocab_size)
        flat = flat_collate()(feats)
        assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
        with torch.no_grad():
            packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
            start = 0
            for f in feats:
                alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
                n = len(f["input_ids"])
                torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
                start += n


def test_padding_free_loss_equals_padded_loss(tiny_model_dir):
    model = load(tiny_model_dir, "sdpa")
    feats = features([9, 4, 15, 6], model.config.vocab_size, seed=1)
    with torch.no_grad():
        flat_loss = model(**flat_collate()(feats)).loss
        padded_loss = model(**padded_collate(0)(feats)).loss
    torch.testing.assert_close(flat_loss, padded_loss, atol=1e-5, rtol=1e-5)


def test_flattening_never_supervises_across_boundaries(tiny_model_dir):
    feats = features([5, 5], 1000)
    flat = flat_collate()(feats)
    # The first token of every sample is unsupervised, so no sample learns to predict the next one's start.
    assert flat["labels"][0, 0] == IGNORE and flat["labels"][0, 5] == IGNORE
    assert flat["position_ids"][0].tolist() == list(range(5)) * 2
