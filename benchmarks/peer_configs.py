"""The peer benchmark's settings: one Settings per task, read from a chattune recipe, and the three sides' configs.

Each side gets the same model folder, the same conversations (written once as a `messages` JSON file), the
same LoRA rank / alpha / dropout / targets, learning rate, schedule, warm-up, batch, accumulation, epochs,
gradient checkpointing, seed and max length. Only the framework differs. tests/tools/test_peers.py reads
each side's config back and checks it says the same as the Settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chattune.config.loading import validate
from chattune.data.formats import load_conversations

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; CHATTUNE_SHARED_DATA names it for a checkout elsewhere (a git worktree).
SHARED = Path(os.environ.get("CHATTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")


@dataclass(frozen=True)
class Task:
    """A benchmark task: a chattune recipe, its data, how many rows and what the recipe is changed in."""

    name: str
    recipe: Path
    data: Path
    rows: int | None  # None: every row of the file
    overrides: dict[str, Any] = field(default_factory=dict)
    needs_shared: bool = False


TASKS = {
    # The seeds' role-play recipe, tried on a CPU as its header says (smollm2-135m, 300 rows), for one epoch.
    "roleplay": Task("roleplay", ROOT / "configs" / "roleplay_qwen1.5_7b.yaml", SHARED / "huanhuan.json", 300,
                     {"train": {"epochs": 1}}, needs_shared=True),
    # The demo: the persona "Lumi" from the project's own data, as configs/demo.yaml trains it.
    "persona": Task("persona", ROOT / "configs" / "demo.yaml", ROOT / "src" / "chattune" / "resources" / "persona.json", None),
}


@dataclass(frozen=True)
class Settings:
    """What all three sides share for one task."""

    task: str
    model_dir: str
    data: str  # the messages JSON file every side reads
    rows: int
    max_length: int
    r: int
    alpha: float
    dropout: float
    targets: list[str] | str  # module names, or "all-linear"
    learning_rate: float
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    epochs: float
    batch: int
    grad_accum: int
    gradient_checkpointing: bool
    seed: int
    device: str = "cpu"

    @property
    def steps(self) -> int:
        """Optimizer steps of every side: the last step of an epoch takes what is left (the Trainer's rule)."""
        per_epoch = -(-self.rows // self.batch)  # batches per epoch
        return int(self.epochs * -(-per_epoch // self.grad_accum))


def recipe_config(task: Task, rows: int | None) -> dict[str, Any]:
    """The task's recipe as chattune validates it, with the task's changes applied (a plain dict)."""
    raw = yaml.safe_load(task.recipe.read_text(encoding="utf-8"))
    for section, values in task.overrides.items():
        raw.setdefault(section, {}).update(values)
    raw["data"]["limit"] = rows if rows is not None else task.rows
    return validate(raw, where=str(task.recipe)).model_dump()


def settings_for(task: Task, model_dir: str, data_file: Path, rows: int, device: str = "cpu") -> Settings:
    """The shared settings, read from the task's recipe."""
    cfg = recipe_config(task, rows)
    d, lora, train = cfg["data"], cfg["lora"], cfg["train"]
    # "auto" turns checkpointing on for models over 1B parameters; both models here (135M, 0.5B) are under.
    gc = train["gradient_checkpointing"]
    return Settings(task=task.name, model_dir=model_dir, data=str(data_file), rows=rows, max_length=d["max_length"],
                    r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["target_modules"],
                    learning_rate=train["learning_rate"], scheduler=train["lr_scheduler"], warmup_ratio=train["warmup_ratio"],
                    weight_decay=train["weight_decay"], max_grad_norm=train["max_grad_norm"], epochs=train["epochs"],
                    batch=train["batch_size"], grad_accum=train["grad_accum"], gradient_checkpointing=gc is True,
                    seed=train["seed"], device=device)


def write_conversations(task: Task, rows: int | None, out: Path) -> int:
    """The task's rows as chattune reads them (system prompt, instruction + input as the user turn), as messages JSON."""
    cfg = recipe_config(task, rows)
    d = cfg["data"]
    convs, _ = load_conversations([task.data], fmt=d["format"], system=d["system"], instruction_as=d["instruction_as"],
                                  limit=d["limit"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"messages": c.messages} for c in convs], ensure_ascii=False), encoding="utf-8")
    return len(convs)


def chattune_config(s: Settings, dtype: str, output_dir: str) -> dict[str, Any]:
    """A chattune config (as `chattune train` reads it) for the settings; no probes and no trackers, as the peers."""
    return {
        "model": {"name_or_path": s.model_dir, "dtype": dtype},
        "data": {"train": [s.data], "format": "messages", "max_length": s.max_length, "cache": False},
        "lora": {"r": s.r, "alpha": s.alpha, "dropout": s.dropout, "target_modules": s.targets},
        "train": {"epochs": s.epochs, "batch_size": s.batch, "grad_accum": s.grad_accum, "learning_rate": s.learning_rate,
                  "lr_scheduler": s.scheduler, "warmup_ratio": s.warmup_ratio, "weight_decay": s.weight_decay,
                  "max_grad_norm": s.max_grad_norm, "gradient_checkpointing": s.gradient_checkpointing, "seed": s.seed,
                  "logging_steps": 1, "save_steps": 100000},
        "tracking": {"backends": ["none"], "probe_size": 0},
        "output_dir": output_dir,
    }


def llamafactory_dataset_info(s: Settings) -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json entry for the messages file (system turn first, as it is in every row)."""
    return {"peers": {"file_name": s.data, "formatting": "sharegpt", "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}}}


def llamafactory_config(s: Settings, dtype: str, output_dir: str, dataset_dir: str) -> dict[str, Any]:
    """LLaMA-Factory's train arguments (what `llamafactory-cli train x.yaml` reads) for the settings."""
    cfg = {
        "model_name_or_path": s.model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
        "lora_target": "all" if s.targets == "all-linear" else ",".join(s.targets),
        "dataset": "peers", "dataset_dir": dataset_dir, "template": "smollm2", "cutoff_len": s.max_length,
        "overwrite_cache": True, "output_dir": output_dir, "overwrite_output_dir": True,
        "per_device_train_batch_size": s.batch, "gradient_accumulation_steps": s.grad_accum,
        "learning_rate": s.learning_rate, "num_train_epochs": s.epochs, "lr_scheduler_type": s.scheduler,
        "warmup_steps": s.warmup_ratio,  # a float below 1: a ratio of the steps
        "weight_decay": s.weight_decay, "max_grad_norm": s.max_grad_norm,
        "disable_gradient_checkpointing": not s.gradient_checkpointing, "seed": s.seed, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "plot_loss": False, "dataloader_num_workers": 0,
        "bf16": dtype == "bf16",
    }
    if s.device == "cpu":
        cfg["use_cpu"] = True
    return cfg


def trl_config(s: Settings, dtype: str, output_dir: str) -> dict[str, Any]:
    """TRL's SFTConfig and LoRA arguments; prompt-completion rows, so the loss covers the answers only."""
    sft = {
        "output_dir": output_dir, "per_device_train_batch_size": s.batch, "gradient_accumulation_steps": s.grad_accum,
        "learning_rate": s.learning_rate, "num_train_epochs": s.epochs, "lr_scheduler_type": s.scheduler,
        "warmup_steps": s.warmup_ratio, "weight_decay": s.weight_decay, "max_grad_norm": s.max_grad_norm,
        "gradient_checkpointing": s.gradient_checkpointing, "seed": s.seed, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "max_length": s.max_length, "completion_only_loss": True, "packing": False,
        "dataloader_num_workers": 0, "bf16": dtype == "bf16", "use_cpu": s.device == "cpu",
        "model_init_kwargs": {"dtype": "bfloat16" if dtype == "bf16" else "float32"},
    }
    lora = {"r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout, "task_type": "CAUSAL_LM",
            "target_modules": s.targets}
    return {"model_dir": s.model_dir, "data": s.data, "sft": sft, "lora": lora}


def side_spec(side: str, s: Settings, dtype: str, workdir: Path) -> dict[str, Any]:
    """What one child process needs: its side, dtype, its own config and the settings (for the token counts)."""
    out = str(workdir / "runs" / f"{s.task}-{side}-{dtype}")
    if side == "chattune":
        config = chattune_config(s, dtype, out)
    elif side == "llamafactory":
        info = workdir / "lf-data"
        info.mkdir(parents=True, exist_ok=True)
        (info / "dataset_info.json").write_text(json.dumps(llamafactory_dataset_info(s)), encoding="utf-8")
        config = llamafactory_config(s, dtype, out, str(info))
    else:
        config = trl_config(s, dtype, out)
    return {"side": side, "dtype": dtype, "config": config, "settings": asdict(s)}
