"""Command line: argument parsing only; each verb calls one function.

The options of chat, eval, predict, merge and serve are typed in chattune.options, which builds them here.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterable

from chattune import options
from chattune.errors import ChattuneError
from chattune.files import storage_error

# Each handler imports its verb when it runs: `chattune --help`, `keys` and config errors answer without importing torch.


def _train(args: argparse.Namespace) -> int | None:
    from chattune import config

    nproc = [f"train.nproc={args.nproc}"] if args.nproc else []  # --nproc N is train.nproc=N
    cfg = config.load(args.config, args.overrides + nproc)  # validate before the slow imports below
    from chattune.verbs import train

    return train.main(cfg, args)


def _chat(args: argparse.Namespace) -> None:
    from chattune.verbs import chat

    chat.run(args.run_dir, prompt=args.prompt, system=args.system, compare_base=args.compare_base,
             max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)


def _import_gguf(args: argparse.Namespace) -> None:
    from chattune.model.sources import convert_gguf

    out = convert_gguf(args.file, args.out_dir)
    print(f"wrote {out} (safetensors, tokenizer, generation_config); use it as model.name_or_path={out}")


def _eval(args: argparse.Namespace) -> None:
    from chattune.verbs import eval as eval_verb

    eval_verb.run(args.run_dir, data=args.data, mcq=args.mcq, preference=args.preference, loss=args.loss,
                  metrics=args.metrics, compare_base=args.compare_base,
                  limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, shots=args.shots,
                  name=args.name)


def _predict(args: argparse.Namespace) -> None:
    from chattune.verbs import predict

    predict.run(args.run_dir, data=args.data, out=args.out, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                top_p=args.top_p)


def _merge(args: argparse.Namespace) -> None:
    from chattune.verbs import merge

    merge.run(args.run_dir, out=args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)


def _export(args: argparse.Namespace) -> None:
    from chattune.verbs import export

    export.run(args.run_dir, **{k: getattr(args, k) for k in options.ExportOptions.model_fields})


def _serve(args: argparse.Namespace) -> None:
    from chattune.verbs import serve

    serve.run(args.path, names=args.name, host=args.host, port=args.port,
              api_key=args.api_key or os.environ.get("CHATTUNE_API_KEY"), max_tokens_limit=args.max_tokens_limit,
              max_body_bytes=args.max_body_bytes, max_batch=args.max_batch, max_queue=args.max_queue,
              log_prompts=args.log_prompts, engine=args.engine, check=args.check)


def _plan(args: argparse.Namespace) -> None:
    from chattune import config

    cfg = config.load(args.config, args.overrides)
    from chattune.verbs import plan

    plan.run(cfg, memory=args.memory, device=args.device, gpu=args.gpu, tflops=args.tflops)


def _dashboard(args: argparse.Namespace) -> None:
    from chattune.verbs import dashboard

    dashboard.run(args.path, port=args.port)


def _data_convert(args: argparse.Namespace) -> None:
    from chattune.verbs import data_convert

    data_convert.run(args.input, args.output, to=args.to, instruction=args.instruction, mapping=args.map, system=args.system,
                instruction_as=args.instruction_as, source_format=args.source_format, overwrite=args.overwrite)


def _data_check(args: argparse.Namespace) -> None:
    from chattune import config

    cfg = config.load(args.config, args.overrides)
    from chattune.verbs import data_check

    data_check.run(cfg, preview=args.preview, out=args.out)


def _sweep(args: argparse.Namespace) -> None:
    from chattune.verbs import sweep

    sweep.run(args.config, args.overrides, grid=args.grid, overwrite=args.overwrite, in_process=args.in_process,
              dry_run=args.dry_run)


def _report(args: argparse.Namespace) -> None:
    from chattune.verbs import report

    report.run(args.run_dirs, out=args.out)


def _ui(args: argparse.Namespace) -> None:
    from chattune.ui import server

    server.run(host=args.host, port=args.port, lang=args.lang, allow=args.allow, auth=args.auth)


def _keys(args: argparse.Namespace) -> None:
    from chattune.config import iter_keys

    _print_keys(iter_keys())
    print("\noptions of the verbs (chattune VERB --option-name VALUE, e.g. chattune serve RUN_DIR --port 8080):")
    _print_keys(options.iter_keys())


def _print_keys(keys: Iterable[tuple[str, Any, str]]) -> None:
    for key, default, help_ in keys:
        print(f"{key:34} {default!r:>16}  {help_}")


RUN_DIR_HELP = "a run directory written by `chattune train`"


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune a model as a config says")
    t.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. train.epochs=2 lora.r=64")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    t.add_argument("--resume", action="store_true",
                   help="insist on continuing from the last checkpoint (an unfinished run resumes without it too)")
    t.add_argument("--resume-force", action="store_true",
                   help="resume even though the data, tokenizer, template, max_length or LoRA shape changed")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (one per GPU; gloo on CPU) through torchrun; same as train.nproc=N")
    t.set_defaults(func=_train)


def _add_run_users(sub: argparse._SubParsersAction) -> None:
    """chat, eval, predict, merge, export, serve: their options come from chattune.options, typed once there."""
    c = sub.add_parser("chat", help="chat with a trained run (streaming, multi-turn)")
    c.add_argument("run_dir", help=RUN_DIR_HELP)
    options.add_arguments(c, options.ChatOptions)
    c.set_defaults(func=_chat)

    e = sub.add_parser("eval", help="score a run: generation metrics, multiple-choice accuracy, preference pairs, loss on any data")
    e.add_argument("run_dir", help=RUN_DIR_HELP)
    options.add_arguments(e, options.EvalOptions)
    e.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="answer every row of a data file (batched, resumable)")
    pr.add_argument("run_dir", help=RUN_DIR_HELP)
    pr.add_argument("--data", required=True, help="rows to answer")
    pr.add_argument("--out", required=True, help="JSON-lines output; rows already there are not generated again")
    options.add_arguments(pr, options.PredictOptions)
    pr.set_defaults(func=_predict)

    m = sub.add_parser("merge", help="merge the adapter into the base model and verify the logits")
    m.add_argument("run_dir", help=RUN_DIR_HELP)
    m.add_argument("--out", required=True, help="folder for the merged model")
    options.add_arguments(m, options.MergeOptions)
    m.set_defaults(func=_merge)

    x = sub.add_parser("export", help="GGUF for llama.cpp / LM Studio, or GGUF + Modelfile for Ollama, checked against llama.cpp")
    x.add_argument("run_dir", help=RUN_DIR_HELP)
    options.add_arguments(x, options.ExportOptions)
    x.set_defaults(func=_export)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API for runs (several adapters on one base) or a merged model")
    s.add_argument("path", nargs="+", help="run directories (one base model) or one merged model folder")
    s.add_argument("--name", action="append", metavar="NAME=PATH", help="serve PATH under NAME (default: its folder name)")
    options.add_arguments(s, options.ServeOptions)
    s.set_defaults(func=_serve)


def _add_tools(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dashboard", help="open the local SwanLab dashboard of a run or project folder")
    d.add_argument("path", help="a run directory or the folder holding several runs")
    d.add_argument("--port", type=int, default=5092, help="TCP port on 127.0.0.1")
    d.set_defaults(func=_dashboard)

    g = sub.add_parser("import-gguf", help="convert a .gguf file to a plain safetensors model folder")
    g.add_argument("file", help="the .gguf file")
    g.add_argument("out_dir", help="the folder to write")
    g.set_defaults(func=_import_gguf)

    u = sub.add_parser("ui", help="the whole loop in a browser page (configure, check data, train, chat, evaluate)")
    options.add_arguments(u, options.UiOptions)
    u.set_defaults(func=_ui)

    k = sub.add_parser("keys", help="list every config key, and every option of the verbs, with its default and help")
    k.set_defaults(func=_keys)


def _add_data(sub: argparse._SubParsersAction) -> None:
    dt = sub.add_parser("data", help="convert data files between layouts; check data as training will see it")
    dsub = dt.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    dc = dsub.add_parser("convert", help="convert records to alpaca, messages or sharegpt (.json, .jsonl, .parquet)")
    dc.add_argument("input", help="data file: .json, .jsonl, .csv or .parquet")
    dc.add_argument("output", help="file to write: .json, .jsonl or .parquet (rejected records go to OUTPUT.rejects.jsonl)")
    dc.add_argument("--to", required=True, choices=["alpaca", "messages", "sharegpt"], help="record layout to write")
    dc.add_argument("--instruction", help="fixed instruction for every record that has none, e.g. a task description")
    dc.add_argument("--map", help="rename columns NEW=OLD before converting, e.g. input=question,output=answer")
    dc.add_argument("--system", help="system prompt for records that carry none")
    dc.add_argument("--instruction-as", default="user", choices=["user", "system"],
                    help="alpaca input: instruction joins the user turn, or becomes the system prompt (as data.instruction_as)")
    dc.add_argument("--from", dest="source_format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages"],
                    help="layout of the input records (default: recognised from their keys)")
    dc.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    dc.set_defaults(func=_data_convert)
    dk = dsub.add_parser("check", help="rows, invalid rows, duplicates, token lengths, truncation, label-mask preview")
    dk.add_argument("config", help="YAML config whose data, model (tokenizer, template) and max_length are checked")
    dk.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. data.max_length=2048")
    dk.add_argument("--preview", type=int, default=2, metavar="N", help="show the label mask of the first N samples (0: none)")
    dk.add_argument("--out", help="folder for check.json and token_lengths.png (default: <output_dir>/../data_check/<name>)")
    dk.set_defaults(func=_data_check)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="estimate peak memory and time per epoch before training; settings that fit --memory")
    pl.add_argument("config", help="YAML config to plan, e.g. configs/roleplay_qwen1.5_7b.yaml")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. train.batch_size=2")
    options.add_arguments(pl, options.PlanOptions)
    pl.set_defaults(func=_plan)


def _add_sweep_report(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser("sweep", help="train every combination of a grid of config values and compare the runs")
    sw.add_argument("config", help="YAML config; its sweep.grid (if any) is the grid, --grid adds to it or replaces keys")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys for every run")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="values of one key, e.g. --grid lora.r=8,64 (repeat for more keys; YAML values, [a,b] for a list)")
    sw.add_argument("--overwrite", action="store_true", help="retrain runs that already finished (default: keep them)")
    sw.add_argument("--in-process", action="store_true",
                    help="train in this process instead of one subprocess per run (faster start, less isolation)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their overrides, train nothing")
    sw.set_defaults(func=_sweep)

    rp = sub.add_parser("report", help="one self-contained HTML page: config, curves, eval results, probe answers")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding runs (a sweep's output_dir)")
    rp.add_argument("--out", default="report.html", help="HTML file to write")
    rp.set_defaults(func=_report)


def build_parser() -> argparse.ArgumentParser:
    """The `chattune` argument parser with one sub-command per verb."""
    p = argparse.ArgumentParser(prog="chattune", description="Fine-tune chat LLMs with LoRA / QLoRA from one YAML file.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_add_train, _add_run_users, _add_tools, _add_data, _add_plan, _add_sweep_report):
        add(sub)
    return p


# Library warnings a chattune user can do nothing about: (category, module that warns, start of the message).
# The complete list seen with every warning shown (`python -W default`, --debug) in `train configs/demo.yaml`,
# `chat RUN --prompt`, `eval`, `merge`, and training with model.quantization=4bit and 8bit. Any other warning
# is shown; --debug shows these too.
NOISY_WARNINGS: list[tuple[type[Warning], str, str]] = [
    # peft reads the property transformers renamed to is_activation_checkpointing; once per model load.
    (FutureWarning, "transformers.modeling_utils", "`is_gradient_checkpointing` is deprecated"),
    # importing peft imports bitsandbytes, whose torch.compile loads torch/utils/mkldnn.py: 14 of these.
    (DeprecationWarning, "torch.jit._script", "`torch.jit.script_method` is deprecated"),
]


def _filter_noisy_warnings() -> None:
    """Hide NOISY_WARNINGS, each matched by category, exact module name and message start."""
    for category, module, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category, module=re.escape(module) + r"\Z")


class _OffStdout(logging.Filter):
    """DeepSpeed logs "Setting accelerator to CPU ..." to stdout on machines without a GPU, where it is expected;
    stdout is for results (`chattune predict ... | jq`). The note goes to chattune's log at debug level instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Setting accelerator to CPU" in record.getMessage():
            logging.getLogger("chattune").debug("deepspeed: %s", record.getMessage())
            return False
        return True


def keep_deepspeed_off_stdout() -> None:
    """Install _OffStdout on DeepSpeed's logger (before DeepSpeed is imported; it keeps the logger's filters)."""
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _OffStdout) for f in ds.filters):
        ds.addFilter(_OffStdout())


def _quiet_libraries() -> None:
    # Library chatter (deprecation notes, tokenizer hints) buries our own messages.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _filter_noisy_warnings()
    _quiet_transformers()
    # bitsandbytes warns at import that the optional `kernels` package is missing (its own CPU kernels work)
    # and, in 8-bit, on every matmul that bf16 inputs are cast to fp16: thousands of lines per run.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _quiet_transformers() -> None:
    """transformers logs errors only, and neither it nor huggingface_hub draws progress bars."""
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:  # loaded already: tell them directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    else:
        # Read when they load. Importing transformers.utils here only to set this took 2.5 s of the 3.3 s that
        # `chattune keys` or a config error took (measured), and those never load transformers.
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def main(argv: list[str] | None = None, *, entry: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Run the CLI; user mistakes print one paragraph and return 2, never a traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting key=value positionals at the first option: `train c.yaml --overwrite a=b`.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    keep_deepspeed_off_stdout()
    if not args.debug:
        _quiet_libraries()
    try:
        rc = (entry or args.func)(args)  # a verb may return an exit status (train --nproc: torchrun's)
    except ChattuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk or a folder that is not writable, wherever the verb was writing
        err = storage_error(exc)
        if err is None or args.debug:
            raise
        print(f"error: {err.render()}", file=sys.stderr)
        return err.exit_code
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
