"""A plan for a config: what `chattune plan` measures (the model's shape, the data's token lengths, the device's
speed) and the estimates made from it (train/plan.py)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from chattune.config import ModelConfig, RunConfig
from chattune.data.check import scan_files
from chattune.data.mix import take
from chattune.data.render import IGNORE, ChatRenderer, Sample, render_all
from chattune.errors import ConfigError, ModelError
from chattune.infer.session import config_renderer
from chattune.model.load import cpu_has_fast_bf16
from chattune.model.sources import PACKAGED_ALIASES, resolve_model_dir
from chattune.train import plan as est
from chattune.train.throughput import PEAK_BF16, peak_flops
from chattune.train.shape import Shape, from_config_dict, from_model_dir, known_shape

# A training step reaches only part of a device's peak: measured here, a LoRA step of SmolLM2-135M in bf16 ran at
# about 0.3 of a plain bf16 matmul's speed on the 2-core CPU; 0.4 of the datasheet peak is a common GPU figure.
CPU_EFFICIENCY = 0.3
GPU_EFFICIENCY = 0.4


@dataclass
class DataSize:
    lengths: list[int]  # tokens of each training sample as training will cut it
    supervised: int
    exact: bool  # False: the tokenizer was not on disk, every sample counted at max_length

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def supervised_fraction(self) -> float:
        return self.supervised / self.tokens if self.tokens else 1.0

    @classmethod
    def from_samples(cls, samples: list[Sample], max_length: int, overlength: str) -> "DataSize":
        """Untruncated samples, cut (or dropped) at max_length as training will."""
        kept = [s for s in samples if overlength == "truncate" or len(s.input_ids) <= max_length]
        sup = sum(sum(label != IGNORE for label in s.labels[:max_length]) for s in kept)
        return cls([min(len(s.input_ids), max_length) for s in kept], sup, True)

    def largest_batch(self, batch_size: int, max_length: int) -> list[int]:
        longest = sorted((min(n, max_length) for n in self.lengths), reverse=True)[:batch_size]
        return longest or [max_length] * batch_size

    def describe(self) -> str:
        if not self.exact:
            return (f"{len(self.lengths)} samples, each counted at max_length (an upper bound: the tokenizer is not "
                    "on disk, or these are preference pairs)")
        return f"{len(self.lengths)} samples, {self.tokens:,} tokens, {self.supervised:,} supervised"


def model_shape(m: ModelConfig) -> Shape:
    """The shape from the folder on disk, else the hub's config.json, else the table of known models."""
    on_disk = m.name_or_path.lower() in PACKAGED_ALIASES or Path(m.name_or_path).expanduser().exists()
    if on_disk:
        model_dir = resolve_model_dir(m.name_or_path, source=m.source, revision=m.revision,
                                      trust_remote_code=m.trust_remote_code)
        return from_model_dir(model_dir, trust_remote_code=m.trust_remote_code)
    config = _hub_config(m)
    if config is not None:
        return from_config_dict(config, source=f"{m.name_or_path}'s config.json")
    shape = known_shape(m.name_or_path)
    if shape is None:
        raise ModelError(f"cannot read the shape of {m.name_or_path}: not on disk, not reachable on the hub, "
                         "and not in chattune's table of known models", where="model.name_or_path",
                         fix="download the model (or just its config.json) into a folder and give that folder")
    return shape


def _hub_config(m: ModelConfig) -> dict | None:
    """config.json from the local hub cache or the hub itself; None when neither answers.

    Offline, huggingface_hub would retry for about a minute before giving up: one name lookup says it first.
    """
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        path = try_to_load_from_cache(m.name_or_path, "config.json", revision=m.revision)
        if not isinstance(path, str):
            socket.getaddrinfo("huggingface.co", 443)
            path = hf_hub_download(m.name_or_path, "config.json", revision=m.revision)
    except Exception:  # offline, unknown id, no access: the caller falls back to the table
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def data_size(cfg: RunConfig) -> DataSize:
    """Token lengths of the training samples, with the tokenizer and template training would use."""
    _, conversations = scan_files(cfg)
    conversations = _as_mixed(cfg, conversations)
    if not conversations:
        raise ConfigError("no usable training records", where=", ".join(cfg.data.train_paths),
                          fix="`chattune data check CONFIG` lists what is wrong with them")
    renderer = _renderer(cfg) if cfg.train.method == "sft" else None  # pairs: counted at max_length
    if renderer is None:
        return DataSize([cfg.data.max_length] * len(conversations), cfg.data.max_length * len(conversations), False)
    d = cfg.data
    samples, _ = render_all(renderer, conversations, max_length=d.max_length, overlength=d.overlength, train_on=d.train_on)
    supervised = sum(sum(label != IGNORE for label in s.labels) for s in samples)
    return DataSize([len(s.input_ids) for s in samples], supervised, True)


def _as_mixed(cfg: RunConfig, conversations: list) -> list:
    """The part of each data.train entry that training takes ({path, fraction|samples}), drawn as training draws it."""
    if not cfg.data.mixed:
        return conversations
    out = []
    for position, source in enumerate(cfg.data.train):
        path = str(source if isinstance(source, str) else source.path)
        rows = [c for c in conversations if c.where.startswith((f"{path}[", f"{path}:"))]
        out += take(rows, source, seed=cfg.train.seed, position=position) if rows else []
    return out


def _renderer(cfg: RunConfig) -> ChatRenderer | None:
    m = cfg.model
    if not (m.name_or_path.lower() in PACKAGED_ALIASES or Path(m.name_or_path).expanduser().exists()):
        return None  # a hub id: planning downloads nothing but config.json
    return config_renderer(cfg)


def setting_from(cfg: RunConfig, shape: Shape, *, device: str) -> est.Setting:
    """The config's own setting on `device` (auto: this machine's), with each `auto` resolved as training would."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" or cpu_has_fast_bf16() else "fp32"
    gc = cfg.train.gradient_checkpointing
    t = cfg.train
    return est.Setting(device=device, dtype_bytes=4 if dtype == "fp32" else 2, quantization=cfg.model.quantization,
                       # a preference pair trains its chosen and rejected answers in one batch
                       batch_size=t.batch_size * (1 if t.method == "sft" else 2), grad_accum=t.grad_accum,
                       gradient_checkpointing=shape.params > 1e9 if gc == "auto" else bool(gc),
                       max_length=cfg.data.max_length)


def device_speed(s: est.Setting, *, gpu: str | None, tflops: float | None) -> float:
    """Effective FLOP/s of a training step: given, from a GPU's datasheet peak, or from a short CPU matmul."""
    if tflops:
        return tflops * 1e12
    if s.device == "cuda":
        name = gpu or _this_gpu()
        peak = gpu_peak(name) if name else None
        if peak is None:
            raise ConfigError(f"unknown GPU {name!r}" if name else "no GPU here to measure", where="--gpu",
                              fix=f"name one of {', '.join(PEAK_BF16)}, or give --tflops (effective TFLOP/s)")
        return peak * GPU_EFFICIENCY
    return _cpu_matmul_flops(s.dtype_bytes) * CPU_EFFICIENCY


def gpu_peak(name: str) -> float | None:
    """A GPU's peak by its device name, or by a short name a user types (4090, a100)."""
    peak = peak_flops(name)
    if peak is None:
        keys = [k for k in PEAK_BF16 if name.strip().lower() in k.lower()]
        peak = PEAK_BF16[min(keys, key=len)] if keys else None
    return peak


def _this_gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _cpu_matmul_flops(dtype_bytes: int, seconds: float = 0.3) -> float:
    import torch

    dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a  # warm-up: the first call picks kernels
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - start)


@dataclass
class Plan:
    """The config's own setting and its estimate; with a memory limit, every candidate setting and its estimate."""

    setting: est.Setting
    estimate: est.Estimate
    epoch_seconds: float
    data: DataSize
    speed: float  # effective FLOP/s the time is computed at
    shape: Shape
    limit: float | None = None
    suggestions: list[tuple[est.Setting, est.Estimate]] = field(default_factory=list)

    def headline(self) -> str:
        return (f"plan: peak memory about {self.estimate.total / est.GIB:.1f} GiB on {self.setting.device}, "
                f"about {duration(self.epoch_seconds)} per epoch (`chattune plan CONFIG` shows the parts)")

    def first_fit(self) -> tuple[est.Setting, est.Estimate] | None:
        return next(((s, e) for s, e in self.suggestions if self.limit is not None and e.total <= self.limit), None)


def make_plan(cfg: RunConfig, data: DataSize, *, device: str = "auto", gpu: str | None = None,
              tflops: float | None = None, limit: float | None = None) -> Plan:
    """Estimate cfg on `device`; with a limit, also every setting that keeps the effective batch."""
    shape = model_shape(cfg.model)
    setting = setting_from(cfg, shape, device="cuda" if gpu else device)
    speed = device_speed(setting, gpu=gpu, tflops=tflops)

    def one(s: est.Setting) -> est.Estimate:
        return est.estimate(shape, s, r=cfg.lora.r, targets=cfg.lora.target_modules,
                            batch_lengths=data.largest_batch(s.batch_size, s.max_length),
                            supervised_fraction=data.supervised_fraction)

    seconds = est.seconds(shape, setting, data.tokens, speed, supervised_fraction=data.supervised_fraction)
    plan = Plan(setting, one(setting), seconds, data, speed, shape, limit)
    if limit is not None:
        plan.suggestions = [(s, one(s)) for s in est.candidates(setting)]
    return plan


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
