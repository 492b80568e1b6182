"""What a run trains on: conversations loaded, split into training, eval and probe rows, rendered to samples."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from chattune.config import RunConfig
from chattune.data.cache import render_cached
from chattune.data.formats import Conversation, LoadReport, load_conversations
from chattune.data.mix import mix
from chattune.data.preference import check_layout, load_pairs, pair_conversations, render_pairs
from chattune.data.render import ChatRenderer, RenderStats, Sample, render_all
from chattune.data.split import split_eval
from chattune.errors import ConfigError
from chattune.model.sources import cache_root
from chattune.train.preference import require_trl
from chattune.train.processes import main_process_first

log = logging.getLogger("chattune")


@dataclass
class TrainingData:
    """Everything the Trainer and the run's reports need from the data."""

    conversations: list[Conversation]  # the training rows (probes held out): what the checkpoints' fingerprint covers
    samples: list[Sample]
    stats: RenderStats
    load_report: LoadReport
    probes: list[Conversation]
    eval_samples: list[Sample]
    eval_info: dict[str, Any] | None  # for data_report.json; None without eval data


def prepare_data(cfg: RunConfig, renderer: ChatRenderer) -> TrainingData:
    """Load, split and render the data the way cfg.data and cfg.tracking say."""
    check_layout(cfg.data.train_paths, cfg.train.method)  # preference data for sft, or sft data for dpo: say so now
    if cfg.train.method != "sft":
        require_trl()
        return prepare_pairs(cfg, renderer)
    conversations, load_report = load_training_data(cfg)
    conversations, eval_conversations = split_eval_data(cfg, conversations)
    probes, conversations = split_probes(cfg, conversations, eval_conversations)
    probes = list(probes)
    with main_process_first():  # the others reuse the main process's tokenised cache
        samples, stats = render_training_data(cfg, renderer, conversations)
    eval_samples, eval_info = render_eval_data(cfg, renderer, eval_conversations)
    return TrainingData(conversations, samples, stats, load_report, probes, eval_samples, eval_info)


def prepare_pairs(cfg: RunConfig, renderer: ChatRenderer) -> TrainingData:
    """Preference data: pairs loaded, the first tracking.probe_size held out as probes, both sides rendered.

    samples (and conversations) alternate chosen, rejected; probes are prompts whose reference is the chosen answer.
    """
    d, t = cfg.data, cfg.tracking
    pairs, load_report = load_pairs(d.train_paths, system=d.system, on_bad_record=d.on_bad_record, limit=d.limit)
    if d.mixed:
        pairs, load_report.mix = mix(d.train, lambda p: load_pairs([p], system=d.system, on_bad_record=d.on_bad_record),
                                     seed=cfg.train.seed)
        load_report.kept, load_report.per_file = len(pairs), {p: i["used"] for p, i in load_report.mix.items()}
    probes = [p.side("chosen") for p in pairs[: t.probe_size]]
    if t.probe_size and not t.probe_file and t.probe_holdout:
        pairs = pairs[t.probe_size:]
        if not pairs:
            raise ConfigError(f"holding out {t.probe_size} probe pairs leaves no training data",
                              where="tracking.probe_size", fix="lower tracking.probe_size or add data")
    if t.probe_file:
        probes, _ = load_conversations([t.probe_file], fmt=d.format, system=d.system, instruction_as=d.instruction_as)
        probes = probes[: t.probe_size]
    samples, stats = render_pairs(renderer, pairs, max_length=d.max_length, overlength=d.overlength)
    log.info("data: %d preference pairs -> %d rendered pairs", len(pairs), len(samples) // 2)
    return TrainingData(pair_conversations(pairs), samples, stats, load_report, probes, [], None)


def load_training_data(cfg: RunConfig) -> tuple[list[Conversation], LoadReport]:
    """Training files -> conversations, with the config's format rules."""
    d = cfg.data

    def load(paths: list[str], limit: int | None = None) -> tuple[list[Conversation], LoadReport]:
        return load_conversations(paths, fmt=d.format, system=d.system, instruction_as=d.instruction_as,
                                  on_bad_record=d.on_bad_record, limit=limit, packed=True)

    if not d.mixed:
        return load(d.train_paths, d.limit)
    conversations, per_source = mix(d.train, lambda p: load([p]), seed=cfg.train.seed)
    conversations = conversations[: d.limit] if d.limit else conversations
    for path, info in per_source.items():
        log.info("data mix: %s gave %d of its %d rows%s", path, info["used"], info["rows"],
                 "".join(f" ({k} {v})" for k, v in info.items() if k in ("fraction", "samples")))
    report = LoadReport(kept=len(conversations), per_file={p: i["used"] for p, i in per_source.items()})
    report.mix = per_source
    return conversations, report


def split_probes(cfg: RunConfig, conversations: list[Conversation],
                 eval_conversations: list[Conversation] = ()) -> tuple[list[Conversation], list[Conversation]]:
    """(probes, training conversations): from tracking.probe_file, else the eval rows, else the first training rows."""
    t, d = cfg.tracking, cfg.data
    if t.probe_size == 0:
        return [], conversations
    if t.probe_file:
        probes, _ = load_conversations([t.probe_file], fmt=d.format, system=d.system, instruction_as=d.instruction_as)
        return probes[: t.probe_size], conversations
    if eval_conversations:  # never trained on, so nothing has to be held out
        return list(eval_conversations[: t.probe_size]), conversations
    probes = conversations[: t.probe_size]
    rest = conversations[t.probe_size:] if t.probe_holdout else conversations
    if not rest:
        raise ConfigError(
            f"holding out {t.probe_size} probe rows leaves no training data",
            where="tracking.probe_size",
            fix="lower tracking.probe_size, set tracking.probe_holdout=false, or add data",
        )
    return probes, rest


def split_eval_data(cfg: RunConfig, conversations: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """(training, eval) conversations: data.eval files, or rows split off with data.eval_ratio / eval_size."""
    d = cfg.data
    if d.eval:
        evals, eval_report = load_conversations(d.eval, fmt=d.format, system=d.system, instruction_as=d.instruction_as,
                                                on_bad_record=d.on_bad_record)
        if eval_report.skipped:
            log.warning("eval data: %s", eval_report.skipped_summary())
        return conversations, evals
    return split_eval(conversations, ratio=d.eval_ratio, size=d.eval_size, seed=cfg.train.seed)


def render_eval_data(cfg: RunConfig, renderer: ChatRenderer,
                     conversations: list[Conversation]) -> tuple[list[Sample], dict[str, Any] | None]:
    """Eval conversations rendered exactly like training data, and what to report about them."""
    if not conversations:
        return [], None
    d = cfg.data
    samples, stats = render_all(renderer, conversations, max_length=d.max_length, overlength=d.overlength,
                                train_on=d.train_on)
    source = "files" if d.eval else f"split (seed {cfg.train.seed})"
    log.info("eval: %d conversations (%s) -> %d samples; loss and perplexity every %s", len(conversations), source,
             stats.samples, f"{cfg.train.eval_steps} steps" if cfg.train.eval_steps else "epoch")
    if stats.samples == 0:
        raise ConfigError("no eval samples left after rendering", where="data.eval",
                          fix="check data.max_length and data.overlength")
    return samples, {"source": source, "rows": [c.where for c in conversations], "render": vars(stats)}


def render_training_data(cfg: RunConfig, renderer: ChatRenderer,
                         conversations: list[Conversation]) -> tuple[list[Sample], RenderStats]:
    """Tokenise with labels, reusing the on-disk cache when nothing that matters changed."""
    d = cfg.data
    started = time.perf_counter()
    samples, stats, hit = render_cached(renderer, conversations, cache_dir=cache_root() / "tokenized" if d.cache else None,
                                        max_length=d.max_length, overlength=d.overlength, train_on=d.train_on)
    log.info("data: %s %d samples in %.1fs", "reused tokenised" if hit else "tokenised", len(samples),
             time.perf_counter() - started)
    return samples, stats
