"""The options of the verbs that use a finished run (chat, eval, predict, merge, export, serve), typed once.

Each option's default, help and choices are written here and nowhere else: cli.py builds the verbs'
`--flags` from these models (add_arguments), the verbs' `run()` signatures take their defaults from the
default objects below (GENERATION, CHAT, EVAL, PREDICT, MERGE, EXPORT, SERVE), and `chattune keys` lists them
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
    preference: str | None = Field(None, description="held-out preference pairs: how often chosen beats rejected by mean log-probability per token (95% interval), and the mean margin")
    loss: bool = Field(False, description="with --data: per-token loss and perplexity of the reference answers instead of generating (the forgetting check with --compare-base)")
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


class ExportOptions(_Options):
    """`chattune export RUN_DIR --to gguf|ollama`."""

    to: Literal["gguf", "ollama"] = Field("gguf", description="gguf: one .gguf file; ollama: the .gguf and a Modelfile")
    quant: str = Field("f16", description="GGUF type: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, "
                                          "q4_0, q3_k_m, q2_k (f16/bf16: strict parity check)")
    out: str | None = Field(None, description="folder to write (default: RUN_DIR/export/<name>)")
    name: str | None = Field(None, description="export name: the folder under RUN_DIR/export/ (default: the quant)")
    overwrite: bool = Field(False, description="replace an existing export folder")
    no_check: bool = Field(False, description="skip the llama.cpp parity check")
    check_data: str | None = Field(None, description="rows whose prompts the parity check answers (default: the run's probes)")
    check_limit: int = Field(8, description="parity check: at most this many prompts")
    check_max_new_tokens: int = Field(64, description="parity check: answer length limit")
    repack: bool = Field(False, description="parity check: let llama.cpp repack quantised weights for its CPU kernels "
                                            "(off: it crashed on AVX-512/AMX CPUs, see docs/export.md)")


class ServeOptions(_Options):
    """`chattune serve PATH...`."""

    host: str = Field("127.0.0.1", description="address to bind (loopback unless told otherwise)")
    port: int = Field(8000, description="TCP port")
    api_key: str | None = Field(None, description="require this bearer key (or set CHATTUNE_API_KEY)")
    max_tokens_limit: int = Field(2048, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1_000_000, description="largest request body")
    max_batch: int = Field(32, ge=1, description="completions decoded together (continuous batching)")
    max_queue: int = Field(64, ge=1, description="completions waiting for a batch slot; one more is answered 503")
    log_prompts: bool = Field(False, description="write each request's messages into the access log")
    engine: Literal["chattune", "vllm"] = Field("chattune", description="chattune (this process), or vllm (starts `vllm serve`; needs a GPU)")
    check: bool = Field(False, description="with --engine vllm: refuse to serve when vLLM's greedy answers differ from chattune's")


class UiOptions(_Options):
    """`chattune ui`."""

    host: str = Field("127.0.0.1", description="address to bind; any other than loopback needs --auth")
    port: int = Field(7860, description="TCP port")
    lang: Literal["en", "zh"] = Field("en", description="language of the page at first (switchable on the page)")
    allow: list[str] = Field(default_factory=list,
                             description="a folder the page may read and write besides the working folder (repeatable)")
    auth: str | None = Field(None, description="user:password asked by the page (or set CHATTUNE_UI_AUTH)")


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
EXPORT = ExportOptions()
SERVE = ServeOptions()
UI = UiOptions()
PLAN = PlanOptions()

VERBS: dict[str, type[_Options]] = {"chat": ChatOptions, "eval": EvalOptions, "predict": PredictOptions,
                                    "merge": MergeOptions, "export": ExportOptions, "serve": ServeOptions,
                                    "ui": UiOptions, "plan": PlanOptions}


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
    # argparse expands % in help (for %(default)s): a literal one, as in "95% interval", must be doubled
    help_ = (field.description or "").replace("%", "%%")
    spec: dict[str, Any] = {"default": field.get_default(call_default_factory=True), "help": help_}
    if get_origin(kind) is list:  # repeatable: --allow A --allow B
        spec["action"] = "append"
        kind = get_args(kind)[0]
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
            yield f"{verb}.{name}", field.get_default(call_default_factory=True), field.description or ""
