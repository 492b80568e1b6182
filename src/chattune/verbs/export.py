"""`chattune export RUN --to gguf|ollama`: the run as a GGUF (and an Ollama Modelfile), checked against llama.cpp.

    RUN/export/<name>/            (or --out DIR)
      <run>-<quant>.gguf          llama.cpp's converter + quantiser; the run's template, eos/eot = its end-of-turn ids
      Modelfile                   --to ollama: FROM, TEMPLATE (Go), SYSTEM, PARAMETER stop
      parity.json                 llama.cpp's greedy answers beside chattune's (unless --no-check)
      export.json                 where it came from, the GGUF's chat metadata as read back
      convert.log                 the converter's output

The merge is `chattune merge`'s own (with its logit check); the merged folder is a temporary
intermediate. Everything is written into a temporary folder that replaces the export folder at the
end (files.atomic_dir): a failed or interrupted export leaves no partial GGUF under the final name.
A failed strict parity check (f16/bf16/f32) still publishes the files, for inspection, and exits 3.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from chattune.errors import ExportCheckError, RunDirError
from chattune.export.gguf_build import (architectures_of, build_gguf, check_disk_space, needed_bytes,
                                        parameter_count)
from chattune.export.llamacpp import check_architecture, converter_dir, open_model, runtime_version
from chattune.export.merge import dtype_name, original_dtype, parse_size, say
from chattune.export.ollama import match_layout, modelfile
from chattune.export.parity import chattune_answers, compare, likely_cause, llama_answers, print_table, probe_prompts
from chattune.export.quants import Quant, get_quant
from chattune.files import atomic_dir, write_json, write_text
from chattune.infer.predict import load_rows
from chattune.infer.session import load_run_renderer
from chattune.model.sources import resolve_model_dir
from chattune.options import EXPORT
from chattune.rundir import RunDir, run_lock
from chattune.verbs.merge import merge_into


def run(run_dir: str, *, to: str = EXPORT.to, quant: str = EXPORT.quant, out: str | None = EXPORT.out,
        name: str | None = EXPORT.name, overwrite: bool = EXPORT.overwrite, no_check: bool = EXPORT.no_check,
        check_data: str | None = EXPORT.check_data, check_limit: int = EXPORT.check_limit,
        check_max_new_tokens: int = EXPORT.check_max_new_tokens, repack: bool = EXPORT.repack) -> Path:
    """Entry point of `chattune export`: check the inputs, merge, convert, quantise, write the Modelfile, check."""
    rd = RunDir(Path(run_dir))
    cfg = rd.load_config()
    require_finished(rd)
    q = get_quant(quant)
    version = runtime_version()
    converter = converter_dir()
    model_dir = resolve_model_dir(cfg.model.name_or_path, source=cfg.model.source, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code)
    check_architecture(architectures_of(model_dir), converter, version, where=str(model_dir / "config.json"))
    out_path = export_folder(rd, out, name or q.name, overwrite)
    renderer = load_run_renderer(rd, cfg)
    template = rd.template_file.read_text(encoding="utf-8")
    end_of_turn = renderer.end_of_turn_ids()
    layout, system = (match_layout(lambda m: renderer.text(m, generation_prompt=True), cfg.data.system,
                                   renderer.tokenizer.bos_token) if to == "ollama" else (None, None))
    check_disk_space(out_path, needed_bytes(parameter_count(model_dir), dtype_name(original_dtype(model_dir)), q))
    gguf_name = f"{slug(rd.root.resolve().name)}-{q.name}.gguf"
    say(f"export: {rd.root} -> {out_path / gguf_name} (llama.cpp from llama-cpp-python {version})")
    with run_lock(out_path, "chattune export"), atomic_dir(out_path) as tmp:  # a second export to --out is refused
        merged = tmp / ".merged"
        merge_into(merged, rd, cfg, model_dir, renderer, dtype="auto", shard_bytes=parse_size("50GB"))
        say(f"convert: llama.cpp's converter, then {'no quantiser' if q.is_float else 'its quantiser'} ({q.name})")
        meta = build_gguf(converter, merged, tmp / gguf_name, q, template, end_of_turn, tmp)
        say(f"gguf: template and stop ids read back: eos {meta.eos}, eot {meta.eot} "
            f"({', '.join(meta.token_texts.get(i, '?') for i in (meta.eos, meta.eot))})")
        if layout is not None:
            stops = [renderer.tokenizer.convert_ids_to_tokens(i) for i in end_of_turn]
            write_text(tmp / "Modelfile", modelfile(gguf_name, layout, system, stops))
        result = None if no_check else parity(tmp, merged, tmp / gguf_name, renderer, q, prompts_for(
            rd, cfg, check_data, check_limit), check_max_new_tokens, repack)
        write_json(tmp / "export.json", export_info(rd, model_dir, q, version, meta, layout, system, result))
        shutil.rmtree(merged)
    report(out_path, gguf_name, q, layout, rd, result)
    return out_path


def require_finished(rd: RunDir) -> None:
    """A trained adapter and a finished run (summary.json), or a RunDirError saying which is missing."""
    rd.require_adapter()
    if not rd.is_finished():
        raise RunDirError("the run has not finished (no summary.json): its adapter may be a mid-training save",
                          where=str(rd.root), fix="let `chattune train` finish (or resume it), then export")


def export_folder(rd: RunDir, out: str | None, name: str, overwrite: bool) -> Path:
    """RUN/export/<name> or --out; an existing one only with --overwrite."""
    folder = Path(out).expanduser().resolve() if out else (rd.root / "export" / slug(name)).resolve()
    if folder.exists() and not overwrite:
        raise RunDirError("the export folder already exists", where=str(folder),
                          fix="pass --overwrite to replace it, or choose another --name or --out")
    if folder.exists() and not folder.is_dir():
        raise RunDirError("--out exists and is a file", where=str(folder), fix="choose a folder name")
    return folder


def slug(text: str) -> str:
    """A name Ollama and file systems accept: lower case letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def prompts_for(rd: RunDir, cfg: Any, check_data: str | None, limit: int) -> list[list[dict[str, str]]]:
    """The parity check's prompts: the run's probe questions, or --check-data's rows."""
    rows = [r.prompt for r in load_rows(check_data, cfg)] if check_data else None
    prompts = probe_prompts(rd.predictions, cfg.data.system, rows, limit=limit)
    if not prompts:
        raise RunDirError("the run has no probe questions to check with (predictions/epoch_0.jsonl)",
                          where=str(rd.predictions), fix="pass --check-data FILE, or --no-check")
    return prompts


def parity(folder: Path, merged: Path, gguf_path: Path, renderer: Any, q: Quant, prompts: list, max_new_tokens: int,
           repack: bool) -> dict[str, Any]:
    """Both sides' greedy answers, the table, parity.json; the verdict is applied after the folder is published."""
    import torch

    say(f"check: {len(prompts)} prompts, greedy, up to {max_new_tokens} new tokens, in transformers and in llama.cpp")
    ours = chattune_answers(merged, renderer, prompts, max_new_tokens, torch.float32)
    llm = open_model(gguf_path, n_ctx=max(512, max(len(a.prompt_ids) for a in ours) + max_new_tokens + 8),
                     repack=repack)
    try:
        theirs = llama_answers(llm, prompts, max_new_tokens)
    finally:
        llm.close()
    result = compare(prompts, ours, theirs, strict=q.is_float)
    result.update(quant=q.name, repack=repack, max_new_tokens=max_new_tokens)
    print_table(result, q.name)
    write_json(folder / "parity.json", result)
    return result


def export_info(rd: RunDir, model_dir: Path, q: Quant, version: str, meta: Any, layout: Any, system: str | None,
                result: dict[str, Any] | None) -> dict[str, Any]:
    """export.json: provenance and what was checked."""
    return {"run": str(rd.root.resolve()), "base_model": str(model_dir), "quant": q.name, "llama_cpp_python": version,
            "gguf": meta.as_json(), "ollama_template": layout.name if layout else None, "system": system,
            "parity": None if result is None else {k: result[k] for k in ("agreement", "passed", "probes")}}


def report(out: Path, gguf_name: str, q: Quant, layout: Any, rd: RunDir, result: dict[str, Any] | None) -> None:
    """Where the files went, how to run them, and the parity verdict (exit 3 on a failed strict check)."""
    size = (out / gguf_name).stat().st_size / 2**20
    say(f"wrote {out / gguf_name} ({size:.0f} MiB)" + (f" and {out / 'Modelfile'}" if layout else ""))
    if layout is not None:
        say(f"run it in Ollama: ollama create {slug(rd.root.resolve().name)} -f {out / 'Modelfile'}")
    say(f"run it in llama.cpp: llama-server -m {out / gguf_name} --jinja   (docs/export.md: LM Studio, vLLM)")
    if result is not None and result["passed"] is False:
        raise ExportCheckError(
            f"llama.cpp does not answer like the trained model: {100 * result['agreement']:.0f}% of answers agree "
            f"(at least 90% needed at {q.name}) and stops-where-chattune-stops is {result['stops_where_chattune_stops']}; "
            f"likely cause: {likely_cause(result)}", where=str(out / "parity.json"),
            fix="the files are kept for inspection; compare the rows in parity.json, and report it with the run's template")
