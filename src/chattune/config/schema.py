"""The config schema: every section and key, its type, default and one line of help (`chattune keys` lists them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field("smollm2-135m", description="packaged alias, local HF folder, .gguf file or hub id")
    source: Literal["auto", "hf", "modelscope"] = Field("auto", description="where a hub id is fetched from")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute dtype; auto = bf16 where the hardware runs it fast, else fp16 on GPU / fp32 on CPU"
    )
    chat_template: str | None = Field(
        None, description="builtin template name (chatml, glm4, llama3, gemma) or a .jinja path; default: the tokenizer's own"
    )
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model (only for models you trust)")
    allow_pickle: bool = Field(
        False, description="also load pickle-based weights (.bin/.pt/.pth/.ckpt), which can run code when loaded; default: safetensors only"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="attention kernel")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="load the base model in 8-bit or 4-bit (QLoRA, needs bitsandbytes)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    bnb_4bit_double_quant: bool = Field(True, description="also quantise the 4-bit quantisation constants")
    bnb_4bit_compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="dtype of 4-bit matmuls; auto = model.dtype")
    device_map: str | None = Field(None, description="inference only: spread a model too large for one device (e.g. auto); training uses one device per process")
    adapter: str | None = Field(
        None, description="start training from this run's trained adapter (a run directory such as runs/sft, or an adapter folder) instead of fresh LoRA weights"
    )


class TrainSource(_Section):
    path: str = Field(description="training data file")
    fraction: float | None = Field(None, gt=0, le=1, description="use this fraction of the file's rows, drawn with train.seed")
    samples: int | None = Field(None, ge=1, description="use this many of the file's rows, drawn with train.seed (more than the file has: it is repeated)")

    @model_validator(mode="after")
    def _one_amount(self) -> "TrainSource":
        if self.fraction is not None and self.samples is not None:
            raise ValueError("give fraction or samples for a data.train entry, not both")
        return self


# A plain path or a {path, fraction|samples} mapping, told apart by type, so an error names only the mapping's key.
TrainEntry = Annotated[Union[Annotated[str, Tag("file")], Annotated[TrainSource, Tag("part")]],
                       Discriminator(lambda v: "file" if isinstance(v, str) else "part")]


class DataConfig(_Section):
    train: list[TrainEntry] = Field(
        default_factory=list,
        description="training data file(s): .json, .jsonl, .csv, .parquet; an entry may be {path, fraction} or {path, samples} to mix in part of a file",
    )
    eval: list[str] = Field(default_factory=list, description="evaluation data file(s); or split one off with eval_ratio / eval_size")
    eval_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of the training rows held out for evaluation (fixed seed)")
    eval_size: int = Field(0, ge=0, description="number of training rows held out for evaluation (fixed seed)")
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field("auto", description="record layout of the data files")
    system: str | None = Field(None, description="system prompt for samples that carry none")
    instruction_as: Literal["user", "system"] = Field(
        "user",
        description="alpaca: 'user' joins instruction+input as the user turn; 'system' makes the instruction the system prompt and input the user turn",
    )
    max_length: int = Field(1024, ge=16, description="tokens per sample; longer samples are truncated or dropped (see overlength)")
    overlength: Literal["truncate", "drop"] = Field("truncate", description="what to do with samples longer than max_length")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="which assistant turns are supervised"
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra variables for the chat template, e.g. {enable_thinking: false}"
    )
    on_bad_record: Literal["error", "skip"] = Field("error", description="stop at the first bad record, or skip it and report")
    limit: int | None = Field(None, ge=1, description="use only the first N records of the training data")
    cache: bool = Field(True, description="reuse tokenised samples from an earlier run with identical inputs")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @property
    def train_paths(self) -> list[str]:
        """The training files, whether named plainly or as {path, fraction|samples}."""
        return [t if isinstance(t, str) else t.path for t in self.train]

    @property
    def mixed(self) -> bool:
        """True when some training file is used in part (a fraction or a sample count)."""
        return any(not isinstance(t, str) and (t.fraction is not None or t.samples is not None) for t in self.train)

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataConfig":
        # Two ways of choosing eval rows at once would leave it unclear which rows were held out.
        if self.eval_ratio and self.eval_size:
            raise ValueError("set data.eval_ratio or data.eval_size, not both")
        if self.eval and (self.eval_ratio or self.eval_size):
            raise ValueError("data.eval names eval files; drop data.eval_ratio / data.eval_size, or drop data.eval")
        return self


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=4096, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or all-linear"
    )
    shared_dropout: bool = Field(
        True, description="adapters reading the same input (q/k/v, gate/up) share one dropout mask, as a fused projection does"
    )
    variant: Literal["lora", "dora", "rslora", "pissa", "loraplus"] = Field(
        "lora", description="lora; dora (magnitude + direction); rslora (scale alpha/sqrt(r)); pissa (init from the top singular vectors); loraplus (B learns faster than A)"
    )
    loraplus_lr_ratio: float = Field(16.0, ge=1, description="lora.variant=loraplus: learning rate of B / learning rate of A")
    pissa_niter: int = Field(16, ge=0, description="lora.variant=pissa: subspace iterations of the fast SVD (0 = exact SVD, slow on large layers)")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all-linear":
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


class TrainConfig(_Section):
    epochs: float = Field(3, gt=0, description="passes over the training data")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: use epochs)")
    batch_size: int = Field(4, ge=1, description="samples per device per forward pass")
    grad_accum: int = Field(4, ge=1, description="forward passes per optimizer step")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule"
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    logging_steps: int = Field(1, ge=1, description="log every N optimizer steps")
    save_steps: int = Field(100, ge=1, description="save a checkpoint every N optimizer steps")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations to save memory; auto = on for models over 1B parameters"
    )
    padding_free: bool = Field(True, description="flatten each batch without padding (exact sequence boundaries)")
    compiled_norms: bool = Field(
        True, description="training on a CPU: compile the RMSNorm layers with torch.compile (hidden size >= 256; falls back to eager if it cannot)"
    )
    sampling: Literal["random", "group_by_length"] = Field(
        "random", description="sample order: random, or group_by_length (batches of similar lengths: little padding when padding_free=false)"
    )
    seed: int = Field(42, description="random seed for data order and initialisation")
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (default: every epoch)")
    nproc: int = Field(1, ge=1, description="processes on this machine (one per GPU); above 1 `chattune train` starts torchrun itself (same as --nproc)")
    distributed: Literal["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"] = Field(
        "ddp", description="how several processes share the work: ddp (a replica each), deepspeed_zero2 (shard optimizer + gradients), deepspeed_zero3 (also weights), fsdp (FSDP2)"
    )
    cpu_offload: bool = Field(False, description="deepspeed_zero2/3, fsdp: keep optimizer state (zero3/fsdp: also weights) in CPU memory")
    deepspeed_config: str | None = Field(None, description="your own DeepSpeed JSON (e.g. a copy of configs/distributed/deepspeed_zero3.json) instead of the built-in one")
    method: Literal["sft", "dpo", "orpo", "simpo"] = Field(
        "sft", description="sft (answers); dpo, orpo, simpo (preference pairs: prompt, chosen, rejected; see docs/training-methods.md)"
    )
    beta: float | None = Field(
        None, gt=0, description="dpo: KL strength (default 0.1); orpo: weight of the odds-ratio term (default 0.1); simpo: reward scale (default 2.0)"
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo, simpo: assumed fraction of flipped preference labels (conservative DPO)")

    @property
    def preference_beta(self) -> float:
        """train.beta, or the method's usual default when unset."""
        return self.beta if self.beta is not None else {"simpo": 2.0}.get(self.method, 0.1)

    @model_validator(mode="after")
    def _distributed_options(self) -> "TrainConfig":
        # Options of one engine given to another would be ignored silently.
        if self.cpu_offload and self.distributed == "ddp":
            raise ValueError("train.cpu_offload needs train.distributed=deepspeed_zero2, deepspeed_zero3 or fsdp")
        if self.deepspeed_config and not self.distributed.startswith("deepspeed"):
            raise ValueError("train.deepspeed_config needs train.distributed=deepspeed_zero2 or deepspeed_zero3")
        return self


class SwanlabConfig(_Section):
    mode: Literal["local", "cloud", "offline", "disabled"] = Field(
        "local", description="local: no account, logs on disk + `chattune dashboard`; cloud: SWANLAB_API_KEY or a prior login"
    )
    project: str | None = Field(None, description="project name (default: the output_dir's parent folder name)")
    experiment: str | None = Field(None, description="experiment name (default: the output_dir's folder name)")
    logdir: str | None = Field(None, description="where local/offline logs go (default: <output_dir>/../swanlog)")


class TrackingConfig(_Section):
    backends: list[Literal["swanlab", "tensorboard", "wandb", "none"]] = Field(
        default_factory=lambda: ["swanlab"],
        description="experiment trackers (several at once, or [none]); metrics.jsonl and predictions/ are always written",
    )
    probe_size: int = Field(5, ge=0, description="rows answered before training and after every epoch")
    probe_file: str | None = Field(None, description="probe questions file; default: the eval rows if any, else the first rows of the training data")
    probe_holdout: bool = Field(True, description="keep probe rows taken from the training data out of training")
    probe_max_new_tokens: int = Field(96, ge=1, description="answer length limit for probes")
    swanlab: SwanlabConfig = Field(default_factory=SwanlabConfig)


class SweepConfig(_Section):
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="chattune sweep: key -> values, one run per combination under output_dir (a section key takes mappings, e.g. model: [{name_or_path: a, chat_template: gemma}])",
    )

    @field_validator("grid")
    @classmethod
    def _no_empty_axis(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, values in v.items() if not values]
        if empty:
            raise ValueError(f"no values for {', '.join(empty)}")
        return v


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    output_dir: str = Field("runs/run", description="run directory: adapter, tokenizer, metrics, predictions")

    @model_validator(mode="after")
    def _needs_data(self) -> "RunConfig":
        if not self.data.train:
            raise ValueError("data.train is empty: name at least one training file")
        # QLoRA stores Quant(W - AB): the PiSSA adapter cannot be turned back into a plain LoRA of the original base.
        if self.lora.variant == "pissa" and self.model.quantization != "none":
            raise ValueError("lora.variant=pissa changes the base weights, which a quantised base (model.quantization) "
                             "cannot give back exactly; use lora.variant=lora or dora with QLoRA, or model.quantization=none")
        if self.train.label_smoothing and self.train.method not in ("dpo", "simpo"):
            raise ValueError("train.label_smoothing applies to train.method=dpo or simpo only")
        if self.train.method != "sft":
            self._check_preference()
        return self

    def _check_preference(self) -> None:
        m = self.train.method
        if self.data.eval or self.data.eval_ratio or self.data.eval_size:
            raise ValueError(f"train.method={m}: held-out pairs are scored by `chattune eval RUN --preference FILE`; "
                             "drop data.eval / data.eval_ratio / data.eval_size and keep those pairs in a file of their own")
        if self.train.sampling == "group_by_length":
            raise ValueError(f"train.method={m} batches pairs: use train.sampling=random")
        # DPO's reference is the model with its adapter off, which PiSSA has changed (its residual base).
        if m == "dpo" and self.lora.variant == "pissa" and not self.model.adapter:
            raise ValueError("train.method=dpo with lora.variant=pissa: the adapter-off reference would be PiSSA's "
                             "residual weights, not the base; use another lora.variant")
