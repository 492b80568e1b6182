"""`chattune merge`: fold the adapter into the base model and prove the result answers the same.

    OUT/
      config.json, model.safetensors (or model-0000K-of-0000N.safetensors + index)
      tokenizer.json, tokenizer_config.json   (chat_template inside too, for older tools)
      chat_template.jinja                     the exact template used in training
      generation_config.json                  eos_token_id lists every end-of-turn id
      chattune.json                           where it came from, the training system prompt, the check

Everything is written to a temporary folder beside OUT (files.atomic_dir) that replaces OUT
only once the check passed: a failed merge or check leaves no half-written OUT behind.
The steps (and what they cost in memory) are in export/merge.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chattune.config import RunConfig
from chattune.data.render import ChatRenderer
from chattune.export.merge import (check_out, check_samples, describe_files, dtype_name, merge_and_save,
                                   merge_model_config, original_dtype, parse_size, peak_rss_mib, say, verify,
                                   work_and_target, write_assets, write_info)
from chattune.files import atomic_dir
from chattune.infer.session import load_run_renderer
from chattune.model.sources import resolve_model_dir
from chattune.rundir import RunDir, run_lock
from chattune.options import MERGE


def run(run_dir: str, *, out: str, dtype: str = MERGE.dtype, max_shard_size: str = MERGE.max_shard_size) -> Path:
    """Entry point of `chattune merge`: merge, write atomically, verify the logits, report."""
    rd = RunDir(Path(run_dir))
    cfg = rd.load_config()
    rd.require_adapter()
    shard_bytes = parse_size(max_shard_size)
    out_path = Path(out).expanduser().resolve()
    check_out(out_path, rd)
    model_dir = resolve_model_dir(cfg.model.name_or_path, source=cfg.model.source, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code)
    renderer = load_run_renderer(rd, cfg)
    with run_lock(out_path, "chattune merge"), atomic_dir(out_path) as tmp:
        merge_into(tmp, rd, cfg, model_dir, renderer, dtype=dtype, shard_bytes=shard_bytes)
    say(f"wrote {out_path} ({describe_files(out_path)}); peak memory {peak_rss_mib():.0f} MiB")
    say(f"try it: chattune serve {out_path}   (or load it with AutoModelForCausalLM.from_pretrained)")
    return out_path


def merge_into(folder: Path, rd: RunDir, cfg: RunConfig, model_dir: Path, renderer: ChatRenderer, *, dtype: str,
               shard_bytes: int) -> dict[str, Any]:
    """Merge the run's adapter into its base, write the merged folder into `folder`, verify it; the check's result.

    `chattune export` merges through here too, so an exported GGUF starts from a merge that passed the check.
    """
    base_dtype = original_dtype(model_dir)
    work, target = work_and_target(base_dtype, dtype)
    say(f"merge: base {model_dir} ({dtype_name(base_dtype)}), adapter {rd.adapter}, merged weights in {dtype_name(target)}")
    if cfg.model.quantization != "none":
        say(f"merge: this is a QLoRA run (trained on a {cfg.model.quantization} base); the adapter is merged onto the "
            f"unquantised base in {dtype_name(work)}, so the merged model is the full-precision base + adapter")
    samples = check_samples(rd, renderer, cfg.data.system)
    reference, effect = merge_and_save(model_dir, merge_model_config(cfg.model), rd, work, target, samples, folder,
                                       shard_bytes)
    write_assets(folder, rd, renderer, model_dir)
    result = verify(folder, target, samples, reference, work, effect)
    write_info(folder, rd, cfg, model_dir, base_dtype, target, renderer, result)
    return result
