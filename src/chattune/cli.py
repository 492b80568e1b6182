"""Command line: argument parsing only; each verb calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from chattune.errors import ChattuneError


def _train(args: argparse.Namespace) -> None:
    from chattune import config

    cfg = config.load(args.config, args.overrides)  # validate before the slow imports below
    from chattune.train import run

    run.run(cfg, overwrite=args.overwrite)


def _chat(args: argparse.Namespace) -> None:
    from chattune.infer import chat

    chat.run(args.run_dir, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
             do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)


def _keys(args: argparse.Namespace) -> None:
    from chattune.config import iter_keys

    for key, default, help_ in iter_keys():
        print(f"{key:34} {default!r:>16}  {help_}")


def build_parser() -> argparse.ArgumentParser:
    """The `chattune` argument parser with one sub-command per verb."""
    p = argparse.ArgumentParser(prog="chattune", description="Fine-tune chat LLMs with LoRA / QLoRA from one YAML file.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser("train", help="fine-tune a model as a config says")
    t.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. train.epochs=2 lora.r=64")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    t.set_defaults(func=_train)

    c = sub.add_parser("chat", help="chat with a trained run (streaming, multi-turn)")
    c.add_argument("run_dir", help="a run directory written by `chattune train`")
    c.add_argument("--prompt", help="answer this one prompt, print only the answer, and exit")
    c.add_argument("--system", help="system prompt (default: the one used in training)")
    c.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit")
    c.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    c.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (with --sample)")
    c.set_defaults(func=_chat)

    k = sub.add_parser("keys", help="list every config key with its default and help")
    k.set_defaults(func=_keys)
    return p


def _quiet_libraries() -> None:
    # Library chatter (deprecation notes, tokenizer hints) buries our own messages.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None, *, entry: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Run the CLI; user mistakes print one paragraph and return 2, never a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not args.debug:
        _quiet_libraries()
    try:
        (entry or args.func)(args)
    except ChattuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
