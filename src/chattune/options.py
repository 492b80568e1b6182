"""The options of the verbs that use a finished run (chat, eval, predict, merge, serve), typed once.

Each option's default, help and choices are written here and nowhere else: cli.py builds the verbs'
`--flags` from these models (add_arguments), the verbs' `run()` signatures take their defaults from the
default objects below (GENERATION, CHAT, EVAL, PREDICT, MERGE, SERVE), and `chattune keys` lists them
after the config keys (iter_keys). A verb's inputs without a default (RUN_DIR, predict's --data and --out,
merge's --out) are arguments, not options: cli.py declares them beside the verb.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Iterator, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

BATCH_SIZE = 8  # rows per forward pass in eval and predict


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationOptions(_Options):
    """How an answer is generated: `chattune chat` and `predict` (and serve's max_tokens when a request names none)."""

    max_new_tokens: int = Field(512, description="answer length limit")
    sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(0.7, description="sampling temperature (with --sample)")
    top_p: float = Field(0.9, description="nucleus sampling threshold (with --sample)")


class ChatOptions(GenerationOptions):
    """`chattune chat RUN_DIR`."""

    prompt: str | None = Field(None, description="answer this one prompt, print only the answer, and exit")
    system: str | None = Field(None, description="system prompt (default: the one used in training)")
    compare_base: bool = Field(False, description="show the base model's answer beside the tuned one")


class EvalOptions(_Options):
    """`chattune eval RUN_DIR`."""

    data: str | None = Field(None, description="rows to answer and score against their reference answers")
    mcq: str | None = Field(None, description="multiple-choice file (question, options A-D or a list, answer letter)")
    metrics: str = Field("bleu,rouge,exact", description="comma list of: bleu, rouge, exact")
    compare_base: bool = Field(False, description="score the base model on the same rows too")
    limit: int | None = Field(None, description="use only the first N rows")
    batch_size: int = Field(BATCH_SIZE, description="rows generated or scored together")
    max_new_tokens: int = Field(256, description="answer length limit")
    shots: int = Field(0, description="multiple choice: worked examples placed before each question")
    name: str | None = Field(None, description="result name under RUN_DIR/eval/ (default: the data file's stem)")


class PredictOptions(GenerationOptions):
    """`chattune predict RUN_DIR --data FILE --out FILE`."""

    batch_size: int = Field(BATCH_SIZE, description="rows generated together")


class MergeOptions(_Options):
    """`chattune merge RUN_DIR --out DIR`."""

    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype of the merged weights (auto: the base's own)")
    max_shard_size: str = Field("2GB", description="largest safetensors shard")


class ServeOptions(_Options):
    """`chattune serve PATH`."""

    host: str = Field("127.0.0.1", description="address to bind (loopback unless told otherwise)")
    port: int = Field(8000, description="TCP port")
    api_key: str | None = Field(None, description="require this bearer key (or set CHATTUNE_API_KEY)")
    max_tokens_limit: int = Field(2048, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1_000_000, description="largest request body")


class PlanOptions(_Options):
    """`chattune plan CONFIG`."""

    memory: str | None = Field(None, description="memory to fit, e.g. 24GiB or 80GB: lists the settings that fit it")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="plan for this kind of device (auto: this machine's)")
    gpu: str | None = Field(None, description="plan for this GPU (e.g. A100, H100, 4090): its peak speed gives the time")
    tflops: float | None = Field(None, description="effective training speed in TFLOP/s, instead of measuring or a GPU's peak")


GENERATION = GenerationOptions()
CHAT = ChatOptions()
EVAL = EvalOptions()
PREDICT = PredictOptions()
MERGE = MergeOptions()
SERVE = ServeOptions()
PLAN = PlanOptions()

VERBS: dict[str, type[_Options]] = {"chat": ChatOptions, "eval": EvalOptions, "predict": PredictOptions,
                                    "merge": MergeOptions, "serve": ServeOptions, "plan": PlanOptions}


def flag(name: str) -> str:
    """The command-line spelling of an option: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")


def value_type(annotation: Any) -> tuple[type, list[Any] | None]:
    """(type, choices) of an option's annotation: int | None -> (int, None); Literal['a', 'b'] -> (str, ['a', 'b'])."""
    if get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        return type(choices[0]), choices
    if get_origin(annotation) in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return value_type(inner)
    return annotation, None


def argument_spec(name: str, field: FieldInfo) -> dict[str, Any]:
    """add_argument's keywords for one option: its default, help, type and choices."""
    kind, choices = value_type(field.annotation)
    spec: dict[str, Any] = {"default": field.default, "help": field.description}
    if kind is bool:
        if field.default is not False:
            raise TypeError(f"option {name}: a switch must default to False (--{name} turns it on)")
        spec["action"] = "store_true"
    else:
        spec["type"] = kind
    if choices is not None:
        spec["choices"] = choices
    return spec


def add_arguments(parser: argparse.ArgumentParser, options: type[BaseModel]) -> None:
    """Add one --flag per field of an options model to a verb's parser."""
    for name, field in options.model_fields.items():
        parser.add_argument(flag(name), **argument_spec(name, field))


def iter_keys() -> Iterator[tuple[str, Any, str]]:
    """Yield (verb.option, default, help) for every verb option: `chattune keys` lists them after the config keys."""
    for verb, options in VERBS.items():
        for name, field in options.model_fields.items():
            yield f"{verb}.{name}", field.default, field.description or ""
