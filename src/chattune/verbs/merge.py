"""`chattune merge`: fold the adapter into the base model and prove the result answers the same.

    OUT/
      config.json, model.safetensors (or model-0000K-of-0000N.safetensors + index)
      tokenizer.json, tokenizer_config.json   (chat_template inside too, for older tools)
      chat_template.jinja                     the exact template used in training
      generation_config.json                  eos_token_id lists every end-of-turn id
      chattune.json                           where it came from, the training system prompt, the check

Memory: the base is loaded once, on CPU, in its own dtype (never quantised, also
for QLoRA runs); reference logits are taken from the adapter model before the
in-place merge; the merged model is freed before the written folder is loaded
back for the check. So at most one copy of the weights is in memory at a time.
Everything is written to a temporary folder beside OUT and renamed at the end:
a failed merge or check leaves no half-written OUT behind.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from chattune.errors import ChattuneError, ConfigError, RunDirError
from chattune.options import MERGE

INFO_FILE = "chattune.json"  # also marks a folder as ours: a later merge may replace it
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest |merged - adapter| logit difference accepted, relative to the largest |logit|. The merged
# weights are W + BA rounded once to the stored dtype, while the adapter model adds BA's output at
# run time; in bf16 that rounding alone moves SmolLM2-135M's logits by ~3% of their scale (measured),
# a missing or mis-scaled adapter by ~50%.
_RTOL = {torch.float32: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.08}
_FALLBACK_PROMPTS = ["Hello! Who are you?", "Explain in two sentences why the sky is blue.",
                     "你好，请介绍一下你自己。"]


class MergeCheckError(ChattuneError):
    """The merged model does not reproduce the adapter model's logits."""

    exit_code = 3


def run(run_dir: str, *, out: str, dtype: str = MERGE.dtype, max_shard_size: str = MERGE.max_shard_size) -> Path:
    """Entry point of `chattune merge`: merge, write atomically, verify the logits, report."""
    from chattune.rundir import RunDir

    rd = RunDir(Path(run_dir))
    cfg = rd.load_config()
    rd.require_adapter()
    shard_bytes = parse_size(max_shard_size)
    out_path = Path(out).expanduser().resolve()
    check_out(out_path, rd)

    from chattune.model.sources import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.name_or_path, source=cfg.model.source, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code)
    base_dtype = original_dtype(model_dir)
    target = base_dtype if dtype == "auto" else _DTYPES[dtype]
    # Merge in the finer of the two, so asking for fp32 from a bf16 base is an exact merge.
    work = torch.float32 if torch.float32 in (base_dtype, target) else base_dtype
    say(f"merge: base {model_dir} ({_name(base_dtype)}), adapter {rd.adapter}, merged weights in {_name(target)}")
    if cfg.model.quantization != "none":
        say(f"merge: this is a QLoRA run (trained on a {cfg.model.quantization} base); the adapter is merged onto the "
            f"unquantised base in {_name(work)}, so the merged model is the full-precision base + adapter")

    renderer = run_renderer(rd, cfg)
    samples = check_samples(rd, renderer, cfg.data.system)
    model_cfg = cfg.model.model_copy(update={"quantization": "none", "device_map": None,
                                             "attn_implementation": _cpu_attention(cfg.model.attn_implementation)})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        reference, effect = merge_and_save(model_dir, model_cfg, rd, work, target, samples, tmp, shard_bytes)
        write_assets(tmp, rd, renderer, model_dir)
        result = verify(tmp, target, samples, reference, work, effect)
        write_info(tmp, rd, cfg, model_dir, base_dtype, target, renderer, result)
        _readable(tmp)
        replace_dir(tmp, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out_path} ({describe_files(out_path)}); peak memory {peak_rss_mib():.0f} MiB")
    say(f"try it: chattune serve {out_path}   (or load it with AutoModelForCausalLM.from_pretrained)")
    return out_path


# ---------------------------------------------------------------------------
# the steps


def say(text: str) -> None:
    """One line of progress for the user (stdout: it is the command's output)."""
    print(text, flush=True)


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max-shard-size {text!r} is not a size", fix="write e.g. 2GB, 500MB or 1GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ConfigError(f"--max-shard-size {text!r} is zero", fix="write e.g. 2GB")
    return size


def check_out(out: Path, rd: Any) -> None:
    """OUT must be new, empty, or an earlier merge (which is replaced); never the run directory itself."""
    if out == rd.root.resolve() or rd.root.resolve() in out.parents:
        raise RunDirError("the merged model would be written inside the run directory", where=str(out),
                          fix="choose a folder outside it, e.g. --out runs/demo_merged")
    if out.exists() and not out.is_dir():
        raise RunDirError("--out exists and is a file", where=str(out), fix="choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise RunDirError("--out exists, is not empty, and is not an earlier `chattune merge` output", where=str(out),
                          fix="choose another folder, or empty this one")
    out.parent.mkdir(parents=True, exist_ok=True)


def original_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base model's weights were published in (config.json dtype / torch_dtype)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    return dt if dt in _RTOL else torch.float32


def _cpu_attention(name: str) -> str:
    # flash-attention exists only on CUDA; the merge runs on CPU.
    return "sdpa" if name == "flash_attention_2" else name


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def run_renderer(rd: Any, cfg: Any) -> Any:
    """The run's tokenizer with the exact training template."""
    from transformers import AutoTokenizer

    from chattune.data.render import ChatRenderer

    tok = AutoTokenizer.from_pretrained(str(rd.tokenizer))
    tok.chat_template = rd.template_file.read_text(encoding="utf-8")
    return ChatRenderer(tok, cfg.data.template_kwargs)


def check_samples(rd: Any, renderer: Any, system: str | None, limit: int = 3) -> list[list[int]]:
    """A few rendered conversations to compare logits on: the run's probe questions with their reference answers."""
    from chattune.infer.session import with_system
    from chattune.files import read_jsonl

    probes = read_jsonl(rd.predictions / "epoch_0.jsonl") if (rd.predictions / "epoch_0.jsonl").is_file() else []
    pairs = [(p["question"], p.get("reference") or p.get("answer") or "OK.") for p in probes if p.get("question")]
    pairs = (pairs or [(q, "I'm not sure, but I will try.") for q in _FALLBACK_PROMPTS])[:limit]
    # Whole rendered turns (prompt + answer + end-of-turn) so every kind of token is compared.
    return [renderer.ids(with_system([{"role": "user", "content": q}, {"role": "assistant", "content": a}], system),
                         generation_prompt=False) for q, a in pairs]


def logits_of(model: Any, samples: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits of every position of every sample (one at a time: no padding in the comparison)."""
    model.eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s])).logits[0].float() for s in samples]


def merge_and_save(model_dir: Path, model_cfg: Any, rd: Any, work: torch.dtype, target: torch.dtype,
                   samples: list[list[int]], folder: Path, shard_bytes: int) -> tuple[list[torch.Tensor], float]:
    """Load base + adapter, take reference logits, merge in place, write the shards.

    Returns the adapter model's logits and how far the adapter moves the base's logits (the check's yardstick).
    """
    from peft import PeftModel

    from chattune.model.load import load_model

    base = load_model(model_dir, model_cfg, dtype=work, device_map=None)
    model = PeftModel.from_pretrained(base, str(rd.adapter))
    reference = logits_of(model, samples)
    with model.disable_adapter():
        base_logits = logits_of(model, samples)
    effect = max((r - b).abs().max().item() for r, b in zip(reference, base_logits))
    del base_logits
    merged = model.merge_and_unload(safe_merge=True)  # in place, layer by layer; refuses NaN/inf results
    if target != work:
        merged = merged.to(target)
    merged.config.dtype = target
    merged.save_pretrained(str(folder), max_shard_size=shard_bytes)
    del merged, model, base
    gc.collect()
    return reference, effect


def write_assets(folder: Path, rd: Any, renderer: Any, model_dir: Path) -> None:
    """Tokenizer, the training chat template (file + tokenizer_config), generation_config with every end-of-turn id."""
    from transformers import GenerationConfig

    tok = renderer.tokenizer
    tok.save_pretrained(str(folder))
    template = rd.template_file.read_text(encoding="utf-8")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    # Tools that predate chat_template.jinja (older vLLM, llama.cpp's converter) read it from tokenizer_config.
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    tc["chat_template"] = template
    tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    try:
        gen = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:  # the base ships none
        gen = GenerationConfig.from_pretrained(str(folder))
    # Stopping at <|im_end|> only if it is the tokenizer's eos is how exported models run on: list them all.
    gen.eos_token_id = renderer.end_of_turn_ids()
    gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(str(folder))


def tolerance(reference: list[torch.Tensor], work: torch.dtype, target: torch.dtype) -> float:
    """Accepted max |difference|: the coarser dtype's relative tolerance times the largest |logit|."""
    rtol = max(_RTOL[work], _RTOL[target])
    scale = max(r.abs().max().item() for r in reference)
    return rtol * max(scale, 1.0)


def verify(folder: Path, target: torch.dtype, samples: list[list[int]], reference: list[torch.Tensor],
           work: torch.dtype, effect: float) -> dict[str, Any]:
    """Load the written folder with plain transformers and compare its logits with the adapter model's."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=target)
    got = logits_of(merged, samples)
    del merged
    gc.collect()
    diff = max((g - r).abs().max().item() for g, r in zip(got, reference))
    agree = sum((g.argmax(-1) == r.argmax(-1)).sum().item() for g, r in zip(got, reference))
    positions = sum(len(s) for s in samples)
    tol = tolerance(reference, work, target)
    result = {"samples": len(samples), "positions": positions, "max_abs_diff": diff, "tolerance": tol,
              "argmax_agreement": agree / positions, "adapter_effect": effect, "compute_dtype": _name(target),
              "passed": diff <= tol}
    say(f"check: merged vs adapter logits on {len(samples)} rendered conversations ({positions} positions): "
        f"max |diff| = {diff:.3g} (tolerance {tol:.3g} = {max(_RTOL[work], _RTOL[target]):g} x largest |logit|, "
        f"{_name(target)}); same top token at {100 * agree / positions:.1f}% of positions; "
        f"the adapter itself moves them by up to {effect:.3g}")
    if effect <= tol and diff <= tol:
        say("check: note: the adapter moves the logits by less than the tolerance, so at this dtype the check "
            "cannot tell the merged model from the base; --dtype fp32 makes it strict")
    if not result["passed"]:
        raise MergeCheckError(
            f"the merged model's logits differ from the adapter model's by {diff:.3g} (tolerance {tol:.3g}); "
            "nothing was written",
            where=str(folder.parent),
            fix="rerun with --debug and report it; --dtype fp32 gives an exact merge if the stored dtype is the cause",
        )
    return result


def write_info(folder: Path, rd: Any, cfg: Any, model_dir: Path, base_dtype: torch.dtype, target: torch.dtype,
               renderer: Any, result: dict[str, Any]) -> None:
    """chattune.json: provenance, the training system prompt and template variables (serve uses them), the check."""
    info = {
        "merged_from": str(rd.root.resolve()),
        "base_model": str(model_dir),
        "base_dtype": _name(base_dtype),
        "dtype": _name(target),
        "training_quantization": cfg.model.quantization,
        "run_dtype": cfg.model.dtype,
        "system": cfg.data.system,
        "template_kwargs": cfg.data.template_kwargs,
        "end_of_turn_ids": renderer.end_of_turn_ids(),
        "check": result,
    }
    (folder / INFO_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _readable(folder: Path) -> None:
    # mkdtemp makes the folder private (0700); a model folder should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an earlier merge there is replaced only once the new one is complete."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe_files(folder: Path) -> str:
    """'N safetensors shard(s), X MiB'."""
    shards = sorted(folder.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    return f"{len(shards)} safetensors shard(s), {size / 2**20:.0f} MiB"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
