"""Load a trained run (or its base model) for inference, exactly as it was trained."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.config import RunConfig
from chattune.data.render import ChatRenderer
from chattune.model.load import load_model, load_tokenizer, resolve_dtype
from chattune.model.placement import inference_device_map, map_device, model_devices, place_for_inference
from chattune.model.sources import resolve_model_dir
from chattune.rundir import RunDir

log = logging.getLogger("chattune")


@dataclass
class Session:
    """A model ready to answer, with the renderer (template, stop tokens) used in training."""

    model: Any
    renderer: ChatRenderer
    cfg: RunConfig
    run_dir: RunDir

    @property
    def system(self) -> str | None:
        """The system prompt training used by default."""
        return self.cfg.data.system


def load_session(run_path: str | Path, *, base_only: bool = False) -> Session:
    """The run's tokenizer and template, its base model, and (unless base_only) the trained adapter."""
    run_dir = RunDir(Path(run_path))
    cfg = run_dir.load_config()
    if not base_only:
        run_dir.require_adapter()
    renderer = load_run_renderer(run_dir, cfg)
    model_dir = resolve_model_dir(cfg.model.name_or_path, source=cfg.model.source, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code)
    # cfg.model is the run's own: the base is quantised exactly as in training; model.device_map may spread it.
    # Loaded straight onto the GPU when there is one; dtype auto judged for the device the model computes on.
    device_map = inference_device_map(cfg.model)
    dtype = resolve_dtype(cfg.model.dtype, device=map_device(device_map))
    model = load_model(model_dir, cfg.model, dtype=dtype, device_map=device_map)
    if not base_only:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run_dir.adapter))
    model = place_for_inference(model)  # a no-op when loaded in place; never undoes accelerate's spread
    model.eval()
    log.info("model loaded on %s (%s)", model_devices(model), str(dtype).removeprefix("torch."))
    return Session(model, renderer, cfg, run_dir)


def config_renderer(cfg: RunConfig) -> ChatRenderer:
    """The tokenizer and chat template training would use for cfg (before there is a run)."""
    m = cfg.model
    model_dir = resolve_model_dir(m.name_or_path, source=m.source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    return ChatRenderer(load_tokenizer(model_dir, m), cfg.data.template_kwargs)


def load_run_renderer(run_dir: RunDir, cfg: RunConfig) -> ChatRenderer:
    """The run's saved tokenizer with the exact training template (honours model.trust_remote_code)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir.tokenizer), trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.chat_template = run_dir.template_file.read_text(encoding="utf-8")
    return ChatRenderer(tokenizer, cfg.data.template_kwargs)


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """Prepend a system prompt unless the conversation already has one."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages
