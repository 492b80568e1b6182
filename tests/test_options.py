"""The verbs' options are typed once (chattune/options.py): the parser, the verbs' run() defaults and
`chattune keys` all come from the same models."""

from __future__ import annotations

import argparse
import inspect
from typing import Literal, get_args, get_origin

import pytest
from pydantic import Field

from chattune import cli, options

# run() parameters spelled differently from the option: --sample is do_sample=
PARAM_NAMES = {"sample": "do_sample"}


def verb_parser(verb: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[verb]


def action_for(parser: argparse.ArgumentParser, name: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if options.flag(name) in a.option_strings]
    return action


@pytest.mark.parametrize("verb", sorted(options.VERBS))
def test_the_parser_takes_every_option_from_its_model(verb):
    parser = verb_parser(verb)
    for name, field in options.VERBS[verb].model_fields.items():
        action = action_for(parser, name)
        assert action.dest == name
        assert action.default == field.get_default(call_default_factory=True), name
        assert action.help.replace("%%", "%") == field.description, name  # argparse reads % in help as a format
        kind, choices = options.value_type(field.annotation)
        assert action.choices == choices, name
        if get_origin(kind) is list:  # a repeatable option: --allow A --allow B
            assert isinstance(action, argparse._AppendAction) and action.type is get_args(kind)[0], name
        elif kind is bool:
            assert isinstance(action, argparse._StoreTrueAction), name
        else:
            assert action.type is kind, name


@pytest.mark.parametrize("verb", sorted(options.VERBS))
def test_the_parsed_defaults_are_the_models_defaults(verb):
    required = {"predict": ["--data", "d.jsonl", "--out", "o.jsonl"], "merge": ["--out", "merged"]}.get(verb, [])
    run = [] if verb == "ui" else ["RUN"]  # the page takes no run directory
    args = vars(cli.build_parser().parse_args([verb, *run, *required]))
    defaults = options.VERBS[verb]().model_dump()
    assert {k: args[k] for k in defaults} == defaults


@pytest.mark.parametrize("verb", sorted(cli.build_parser()._subparsers._group_actions[0].choices))
def test_every_verbs_help_prints(verb):
    # `chattune eval --help` raised TypeError: the --preference help says "95% interval", and argparse
    # expands % in help strings.
    text = verb_parser(verb).format_help()
    assert text.startswith("usage: ") and verb in text.splitlines()[0]


def test_every_option_has_help_and_a_verb_section_in_keys():
    keys = list(options.iter_keys())
    assert all(help_ for _, _, help_ in keys), [k for k, _, h in keys if not h]
    assert {k.split(".")[0] for k, _, _ in keys} == {"chat", "eval", "predict", "merge", "export", "serve", "ui",
                                                     "plan"}
    assert ("serve.max_tokens_limit", 2048, "largest max_tokens a request may ask for") in keys


def test_the_defaults_duplicated_before_are_one_definition():
    # 512, 2048 and 1_000_000 were each written in three or four places (cli, verbs, stream, serve's limits).
    assert options.CHAT.max_new_tokens == options.PREDICT.max_new_tokens == options.GENERATION.max_new_tokens == 512
    assert options.EVAL.batch_size == options.PREDICT.batch_size == options.BATCH_SIZE
    assert (options.SERVE.max_tokens_limit, options.SERVE.max_body_bytes) == (2048, 1_000_000)


def _run_defaults(fn) -> dict[str, object]:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.default is not p.empty}


def _expect_same_defaults(fn, model_defaults, names) -> None:
    got = _run_defaults(fn)
    for name in names:
        param = PARAM_NAMES.get(name, name)
        assert param in got, f"{fn.__module__}.{fn.__qualname__} has no parameter {param} with a default"
        assert got[param] == getattr(model_defaults, name), f"{fn.__module__}.{fn.__qualname__}: {param}"


def test_the_verbs_run_defaults_come_from_the_options():
    from chattune.infer.stream import stream_answer
    from chattune.serve import api
    from chattune.verbs import chat, eval, export, merge, predict, serve

    gen = list(options.GenerationOptions.model_fields)
    _expect_same_defaults(stream_answer, options.GENERATION, gen)  # chat.run hands its **gen to stream_answer
    _expect_same_defaults(chat.run, options.CHAT, [n for n in options.ChatOptions.model_fields if n not in gen])
    for module, defaults in ((eval, options.EVAL), (predict, options.PREDICT), (merge, options.MERGE),
                             (export, options.EXPORT), (serve, options.SERVE)):
        _expect_same_defaults(module.run, defaults, type(defaults).model_fields)
    # make_server takes what a bound server needs: every option but --engine/--check (they choose another server).
    _expect_same_defaults(serve.make_server, options.SERVE, [n for n in options.ServeOptions.model_fields
                                                             if n not in ("engine", "check")])
    assert api.DEFAULT_MAX_TOKENS == options.GENERATION.max_new_tokens


def test_value_type_reads_literals_and_optionals():
    assert options.value_type(Literal["a", "b"]) == (str, ["a", "b"])
    assert options.value_type(int | None) == (int, None)
    assert options.value_type(float) == (float, None)


def test_a_switch_that_defaults_on_is_refused():
    class Bad(options.GenerationOptions):
        stream: bool = Field(True, description="stream the answer")

    with pytest.raises(TypeError, match="option stream: a switch must default to False"):
        options.add_arguments(argparse.ArgumentParser(), Bad)
