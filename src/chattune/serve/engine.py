"""What to serve: a run directory (base + adapter) or a merged model folder, ready to answer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.data.render import ChatRenderer
from chattune.errors import ModelError
from chattune.infer.session import Session, load_session
from chattune.model.load import resolve_dtype
from chattune.model.placement import place_for_inference


@dataclass
class Engine:
    """A served model name: the model it runs on, its training template, stop ids and default system prompt.

    Several engines can share one model (a base with several LoRA adapters, serve/adapters.py); adapter is
    the peft adapter the name selects ("__base__" for the base alone, None for a model without adapters).
    """

    model: Any
    renderer: Any
    eos_ids: list[int]
    system: str | None
    name: str
    max_positions: int | None = None
    adapter: str | None = None
    session: Session | None = None

    @property
    def tokenizer(self) -> Any:
        return self.renderer.tokenizer


def load_engine(path: str | Path, name: str | None = None) -> Engine:
    """A run directory (base + adapter) or a merged model folder (its template, generation_config eos ids)."""
    path = Path(path)
    session = None
    if (path / "run_config.yaml").is_file():
        session = load_session(path)
        model, renderer, system = session.model, session.renderer, session.system
        eos = renderer.end_of_turn_ids()
    elif (path / "config.json").is_file():
        model, renderer, system, eos = _load_model_folder(path)
    else:
        raise ModelError("neither a chattune run directory (run_config.yaml) nor a model folder (config.json)",
                         where=str(path), fix="pass a run directory such as runs/demo, or the --out of `chattune merge`")
    model = place_for_inference(model)  # on the GPU, unless accelerate spread it (model.device_map=auto) or quantised it
    model.eval()
    config = getattr(model, "config", None)
    adapter = "default" if session is not None else None  # peft's name for the adapter from_pretrained loads
    return Engine(model, renderer, list(eos), system, name or path.resolve().name,
                  getattr(config, "max_position_embeddings", None), adapter, session)


def _load_model_folder(path: Path) -> tuple[Any, Any, str | None, list[int]]:
    """A plain HF folder: chattune.json (written by merge) gives the system prompt and template variables."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    info_file = path / "chattune.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(info.get("run_dtype", "auto")))
    except Exception as exc:  # transformers raises many types for a broken folder
        raise ModelError(f"cannot load the model folder: {' '.join(str(exc).split())[:300]}", where=str(path),
                         fix="check that it is a complete Hugging Face model folder (config.json, *.safetensors, tokenizer)")
    renderer = ChatRenderer(tok, info.get("template_kwargs") or {})  # raises TemplateError without a template
    eos = list(renderer.end_of_turn_ids())
    try:
        gen_eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except OSError:
        gen_eos = None
    for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
        if i not in eos:
            eos.append(i)
    return model, renderer, info.get("system"), eos
