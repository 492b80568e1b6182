"""Preference tuning (train.method dpo, orpo, simpo): pairs in batches, per-answer log-likelihoods, TRL's losses.

The losses are TRL's own (trl.experimental's CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss, called on
chattune's log-likelihoods); chattune computes what goes into them, from its own labels:
- each answer's summed log-probability over its supervised tokens (the answer through its end-of-turn token),
  from logits at supervised positions only, in padding-free batches exactly as SFT;
- DPO's reference log-probabilities: the base with the adapter switched off (peft's disable_adapter: no second
  copy in memory), once per pair, the first time the pair is trained on; or, when training continues an earlier
  run's adapter (model.adapter), that adapter as loaded, for every pair before the first step (adapter-off would
  be the base, not the SFT model DPO should stay close to).

DPO's sigmoid loss is -log σ(β·((c - c_ref) - (r - r_ref))): TRL 1.16's DPOTrainer writes it inside its
_compute_loss (no separate function to call), and cpo_loss computes exactly that expression of its two inputs,
so DPO calls cpo_loss(loss_type="sigmoid") on the log-ratios against the reference (tests check it against the
formula). SimPO is cpo_loss(loss_type="simpo") on length-normalised log-probabilities; ORPO is the chosen
answers' token-mean negative log-likelihood minus the mean of odds_ratio_loss.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from chattune.config import TrainConfig
from chattune.data.render import Sample
from chattune.errors import MissingDependencyError, extra_pip
from chattune.infer.score import sequence_logps
from chattune.train.processes import sums_over_processes


class PairDataset(torch.utils.data.Dataset):
    """Samples chosen_0, rejected_0, chosen_1, ... as one item per pair (with its index, for the reference)."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples) // 2

    def __getitem__(self, k: int) -> dict[str, Any]:
        c, r = self.samples[2 * k], self.samples[2 * k + 1]
        return {"input_ids": c.input_ids, "labels": c.labels, "rejected_input_ids": r.input_ids,
                "rejected_labels": r.labels, "pair_index": k}


def pair_collate(collate: Callable[[list[dict]], dict[str, Any]]) -> Callable[[list[dict]], dict[str, Any]]:
    """Batches of pairs as chattune's batches of samples (chosen, rejected, chosen, ...) plus the pair indices."""

    def collate_pairs(features: list[dict]) -> dict[str, Any]:
        flat = []
        for f in features:
            flat += [{"input_ids": f["input_ids"], "labels": f["labels"]},
                     {"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]}]
        batch = dict(collate(flat))
        batch["pair_index"] = torch.tensor([f["pair_index"] for f in features])
        return batch

    return collate_pairs


def _trl() -> tuple[Any, Any]:
    """TRL's CPOTrainer and ORPOTrainer classes (their loss methods); MissingDependencyError when TRL is not installed."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the API is pinned (pyproject [prefs]); tests check the math
    try:
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    except ImportError:
        raise MissingDependencyError("trl", pip=extra_pip("prefs"), note="trl==1.16.0",
                                     needed_for="train.method dpo, orpo and simpo (TRL's preference losses)",
                                     where="train.method", otherwise="set train.method=sft") from None
    return CPOTrainer, ORPOTrainer


def require_trl() -> None:
    """Fail before any model loads when the preference losses are not available."""
    _trl()


def preference_loss(t: TrainConfig, sums: torch.Tensor, counts: torch.Tensor,
                    ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's mean loss and its metrics, from per-sequence sums/counts (chosen at even, rejected at odd rows).

    ref: the reference's summed log-probabilities, shape (pairs, 2); DPO only.
    """
    cpo, orpo = _trl()
    c_sum, r_sum, c_n, r_n = sums[0::2], sums[1::2], counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    trl_self = SimpleNamespace(beta=t.preference_beta, label_smoothing=t.label_smoothing, alpha=0.0,
                               simpo_gamma=t.simpo_gamma, accelerator=SimpleNamespace(device=sums.device))
    extra: dict[str, torch.Tensor] = {}
    if t.method == "dpo":
        trl_self.loss_type = "sigmoid"
        ref = ref.to(sums.device)
        losses, chosen, rejected = cpo.cpo_loss(trl_self, c_sum - ref[:, 0], r_sum - ref[:, 1])
        loss = losses.mean()
    elif t.method == "simpo":
        trl_self.loss_type = "simpo"
        losses, chosen, rejected = cpo.cpo_loss(trl_self, c_sum / c_n, r_sum / r_n)
        loss = losses.mean()
    else:  # orpo
        losses, chosen, rejected, ratio, log_odds = orpo.odds_ratio_loss(trl_self, c_sum / c_n, r_sum / r_n)
        nll = -c_sum.sum() / c_n.sum()
        loss = nll - losses.mean()
        extra = {"nll_loss": nll.detach(), "log_odds_ratio": log_odds.detach(), "log_odds_chosen": ratio.detach()}
    metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
               "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean(),
               "logps/chosen": (c_sum / c_n).detach().mean(), "logps/rejected": (r_sum / r_n).detach().mean(),
               **{f"{t.method}/{k}": v for k, v in extra.items()}}
    return loss, metrics


class PreferenceObjective:
    """ChattuneTrainer's loss for preference methods, with the metrics averaged between two log lines.

    DPO's reference: precomputed (reference_logps, for a run that continues an earlier adapter), or else the
    base with the adapter switched off, computed for each batch the first time its pairs come up and kept.
    """

    def __init__(self, t: TrainConfig, reference: torch.Tensor | None = None):
        self.t = t
        self.reference = reference  # (pairs, 2) summed log-probabilities; DPO only
        self._ref_cache: dict[int, torch.Tensor] = {}
        self._sums: dict[str, list[float]] = defaultdict(list)

    def reference_of(self, model: Any, inputs: dict[str, Any], index: torch.Tensor) -> torch.Tensor | None:
        """The batch's reference log-probabilities, shape (pairs, 2); None for ORPO and SimPO."""
        if self.t.method != "dpo":
            return None
        if self.reference is not None:
            return self.reference[index.cpu()]
        missing = [int(k) for k in index if int(k) not in self._ref_cache]
        if missing:
            peft_model = getattr(model, "module", model)  # DDP's wrapper has no disable_adapter
            with torch.no_grad(), peft_model.disable_adapter():
                sums, _ = sequence_logps(peft_model, inputs)
            for k, row in zip(index.tolist(), sums.view(-1, 2).float().cpu()):
                self._ref_cache[k] = row
        return torch.stack([self._ref_cache[int(k)] for k in index])

    def loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """Mean preference loss of the batch's pairs (their metrics are kept for the next log line)."""
        inputs = dict(inputs)
        index = inputs.pop("pair_index")
        ref = self.reference_of(model, inputs, index)
        sums, counts = sequence_logps(model, inputs)
        loss, metrics = preference_loss(self.t, sums, counts, ref)
        if model.training:
            for k, v in metrics.items():
                self._sums[k].append(float(v))
        return loss

    def pop_metrics(self) -> dict[str, float]:
        """The metrics' means since the last call, over every process's batches (empty when nothing was trained).

        Under DDP every process calls this at the same log step (the Trainer logs on all of them); each holds
        only its own pairs' metrics, so they are summed over the processes before the main one writes them.
        """
        keys = sorted(k for k, v in self._sums.items() if v)
        totals = sums_over_processes([sum(self._sums[k]) for k in keys] + [len(self._sums[k]) for k in keys])
        self._sums.clear()
        return {k: round(totals[i] / totals[len(keys) + i], 6) for i, k in enumerate(keys)}


def reference_logps(model: Any, dataset: PairDataset, collate: Callable[[list[dict]], dict[str, Any]], *,
                    batch_size: int, adapter_off: bool) -> torch.Tensor:
    """Every pair's (chosen, rejected) summed log-probabilities under the starting model, shape (pairs, 2)."""
    device = next(p for p in model.parameters()).device
    out = torch.zeros(len(dataset), 2)
    was_training = model.training
    model.eval()
    off = model.disable_adapter() if adapter_off else contextlib.nullcontext()
    with off, torch.no_grad(), tqdm(total=len(dataset), desc="reference log-probs", unit="pair",
                                    dynamic_ncols=True) as bar:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[k] for k in range(start, min(start + batch_size, len(dataset)))])
            index = batch.pop("pair_index")
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            sums, _ = sequence_logps(model, batch)
            out[index] = sums.view(-1, 2).float().cpu()
            bar.update(len(index))
    model.train(was_training)
    return out
