"""One side of the peer benchmark in a fresh process: `python peer_sides.py SPEC.json RESULT.json`.

Runs under the project's Python (chattune, TRL) or LLaMA-Factory's side environment, so it imports nothing
but the standard library at the top, and each framework only in its own function. Every side trains through
its own entry point (chattune's train verb, LLaMA-Factory's run_exp, TRL's SFTTrainer) with the same
Trainer callback added, which counts and times the same things for all three:

- the real (non-padding) tokens and the supervised (answer) tokens of the tokenised training set, cut at
  max_length, read from the dataloader the Trainer built;
- the seconds from the first step's start to the end of training (the Trainer's own loop, not start-up);
- every logged loss, the Trainer's mean training loss, the optimizer steps, and the weights' dtype.

The result, with the process's peak RSS (VmHWM), goes to RESULT.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def count_tokens(dataset: Any, max_length: int) -> dict[str, int]:
    """Rows, real tokens and supervised tokens of a tokenised dataset (labels != -100, or a completion mask)."""
    real = supervised = 0
    for i in range(len(dataset)):
        item = dataset[i]
        real += min(len(item["input_ids"]), max_length)
        if "labels" in item:
            supervised += sum(1 for label in list(item["labels"])[:max_length] if label != -100)
        elif "completion_mask" in item:
            supervised += sum(list(item["completion_mask"])[:max_length])
    return {"rows": len(dataset), "real_tokens": real, "supervised_tokens": supervised}


def weights_dtype(model: Any) -> str:
    """The dtype of the frozen base weights (the trainable adapters may be kept in fp32)."""
    for p in model.parameters():
        if not p.requires_grad:
            return str(p.dtype).replace("torch.", "")
    return "unknown"


def make_clock(max_length: int, out: dict[str, Any]) -> Any:
    """The Trainer callback every side gets; it fills `out`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
            out.update(count_tokens(train_dataloader.dataset, max_length))
            out["weights_dtype"] = weights_dtype(model)
            out["autocast_bf16"] = bool(args.bf16)
            out["losses"] = []
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                out["losses"].append(float(logs["loss"]))
            if "train_loss" in logs:
                out["train_loss"] = float(logs["train_loss"])

        def on_train_end(self, args, state, control, **kw):
            out["train_s"] = time.perf_counter() - self.started
            out["steps"] = state.global_step

    return Clock()


def run_chattune(spec: dict[str, Any], clock: Any) -> None:
    """`chattune train` in this process, with the clock added to the trainer it builds."""
    from chattune.config.loading import validate
    from chattune.verbs import train as verb

    cfg = validate(spec["config"], where="peers chattune config")
    build = verb.build_trainer

    def build_with_clock(*args: Any, **kw: Any) -> Any:
        trainer = build(*args, **kw)
        trainer.add_callback(clock)
        return trainer

    verb.build_trainer = build_with_clock
    verb.run(cfg, overwrite=True)


def run_llamafactory(spec: dict[str, Any], clock: Any) -> None:
    """What `llamafactory-cli train x.yaml` runs, with the clock as an extra callback."""
    from llamafactory.train.tuner import run_exp

    run_exp(dict(spec["config"]), callbacks=[clock])


def run_trl(spec: dict[str, Any], clock: Any) -> None:
    """TRL's SFTTrainer on prompt-completion rows (the loss covers the completion: the answer)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg = spec["config"]
    rows = json.loads(Path(cfg["data"]).read_text(encoding="utf-8"))
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    trainer = SFTTrainer(model=cfg["model_dir"], args=SFTConfig(**cfg["sft"]), train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(cfg["model_dir"]),
                         peft_config=LoraConfig(**cfg["lora"]), callbacks=[clock])
    trainer.train()
    trainer.save_model()


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


SIDES = {"chattune": run_chattune, "llamafactory": run_llamafactory, "trl": run_trl}


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out: dict[str, Any] = {"side": spec["side"], "dtype": spec["dtype"]}
    clock = make_clock(spec["settings"]["max_length"], out)
    SIDES[spec["side"]](spec, clock)
    import torch

    out["torch"] = torch.__version__
    out["peak_rss"] = peak_rss_bytes()
    Path(result_path).write_text(json.dumps(out), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
