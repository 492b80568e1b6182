"""Training speed: chattune vs the seed tutorials' recipe, same model, data and hyperparameters.

    python benchmarks/train_speed.py [--samples 160] [--max-length 384]

Both sides: SmolLM2-135M-Instruct in bf16, LoRA r 8 / alpha 32 / dropout 0.1 on
q/k/v/o/gate/up/down, lr 1e-4, 16 samples per optimizer step, max_length 384,
the same rows of the role-play data in the same order, the same seed. Prints real
(non-padding) tokens per second of both, their ratio, the padding fractions and
both losses (mean over the second half of the steps); the same over steps 2.. (the
first pays one-time costs); and each side's whole process from start to exit, with
its imports and loading. Each side runs in a fresh process of its own, one after the
other, so neither inherits the other's memory.

How the 16 samples of a step are split is each side's own choice, as it is the
user's: the tutorials run 4 x 4 with gradient checkpointing, chattune by default one
packed micro-batch of 16 (about 2,000-2,800 tokens). The loss is normalised by the
step's supervised tokens either way, so the update is the same. The larger packed
row is faster here for a reason of the CPU's matmul library: oneDNN's AMX kernels,
on two threads, keep only one core busy for many shapes with fewer than about 1,300
rows (1200 x 1536 @ 1536 x 576: 1.1 TFLOP/s, the same as one thread; from 1,320 rows:
2.0). `--batch 8` gives the 8 x 2 split of earlier runs.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from common import SYSTEM, machine, reference_features, role_play_rows

from chattune.config import LoraConfig, ModelConfig
from chattune.data.collate import SampleDataset, make_collate
from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer, render_all
from chattune.model.load import load_model, load_tokenizer
from chattune.model.compiled_norms import compile_norms, probe_cpu_in_background
from chattune.model.lora import apply_lora
from chattune.model.packed_attention import use_packed_attention
from chattune.model.sources import resolve_model_dir
from chattune.train.trainer import ChattuneTrainer

REF_BATCH, REF_ACCUM = 4, 4  # the tutorials' split of the 16 samples of a step
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepClock:
    """Trainer callback: seconds spent inside each optimizer step and the loss of each step."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.step_seconds.append(time.perf_counter() - clock._t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    clock.losses.append(logs["loss"])

        self.step_seconds, self.losses, self._t = [], [], 0.0
        self.callback = _CB()

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)


def args_for(out: str, batch: int, accum: int, steps: int, gc: bool):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             learning_rate=1e-4, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                             seed=42, data_seed=42, bf16=True, use_cpu=True, gradient_checkpointing=gc,
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)


def reference(model_dir, rows, steps: int, max_length: int):
    """The tutorials: hand-written prompts, per-example encoding, padded batches of 4 x 4, checkpointing."""
    from peft import LoraConfig as PeftLora, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    feats = reference_features(rows, lambda t: tok(t, add_special_tokens=False)["input_ids"], tok.pad_token_id, max_length)
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.enable_input_require_grads()
    model = get_peft_model(model, PeftLora(task_type="CAUSAL_LM", target_modules=TARGETS, r=8, lora_alpha=32, lora_dropout=0.1))
    clock = StepClock()
    trainer = Trainer(model=model, args=args_for("/tmp/bench-ref", REF_BATCH, REF_ACCUM, steps, True), train_dataset=feats,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=[clock.callback])
    processed = []
    collate = trainer.data_collator
    trainer.data_collator = lambda b: processed.append(collate(b)) or processed[-1]
    trainer.train()
    per_batch = [int(b["attention_mask"].sum()) for b in processed]
    total = sum(b["input_ids"].numel() for b in processed)
    return per_batch, total, clock


def chattune(model_dir, rows, steps: int, max_length: int, batch: int, accum: int):
    """chattune's path: template rendering, padding-free batches, supervised-only loss, no checkpointing."""
    probe_cpu_in_background()  # as `chattune train` does first: inductor's CPU check while the model and data load
    tok = load_tokenizer(model_dir, ModelConfig())
    convs = [Conversation([{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"] + r["input"]},
                           {"role": "assistant", "content": r["output"]}], str(i)) for i, r in enumerate(rows)]
    samples, _ = render_all(ChatRenderer(tok), convs, max_length=max_length)
    torch.manual_seed(42)
    model = load_model(model_dir, ModelConfig(), dtype=torch.bfloat16)
    model = apply_lora(model, LoraConfig(r=8, alpha=32, dropout=0.1, target_modules=TARGETS), gradient_checkpointing=False)
    model.config.use_cache = False
    use_packed_attention(model)
    compile_norms(model)
    clock = StepClock()
    counted = []
    collate = make_collate(True, tok.pad_token_id)
    trainer = ChattuneTrainer(model=model, args=args_for("/tmp/bench-ours", batch, accum, steps, False),
                              train_dataset=SampleDataset(samples), callbacks=[clock.callback],
                              data_collator=lambda b: counted.append(collate(b)) or counted[-1])
    trainer.train()
    per_batch = [b["input_ids"].numel() for b in counted]
    return per_batch, sum(per_batch), clock


def tail_mean(losses: list[float]) -> float:
    half = losses[len(losses) // 2:]
    return sum(half) / len(half)


def run_side(side: str, args) -> dict:
    """One side in this process: real and total tokens, seconds in steps, per-step losses."""
    steps = math.ceil(args.samples / 16)
    rows, source = role_play_rows(args.samples)
    model_dir = resolve_model_dir("smollm2-135m")
    if side == "reference":
        per_batch, total, clock = reference(model_dir, rows, steps, args.max_length)
        accum = REF_ACCUM
    else:
        accum = 16 // args.batch
        per_batch, total, clock = chattune(model_dir, rows, steps, args.max_length, args.batch, accum)
    step_tokens = [sum(per_batch[i:i + accum]) for i in range(0, steps * accum, accum)]
    return {"real": sum(per_batch), "total": total, "seconds": clock.seconds, "losses": clock.losses,
            "source": source, "steps": steps, "step_tokens": step_tokens, "step_seconds": clock.step_seconds}


def after_first(side: dict) -> float:
    """Real tokens/s over steps 2.. (the first step also pays one-time costs: allocations, torch.compile's set-up)."""
    return sum(side["step_tokens"][1:]) / sum(side["step_seconds"][1:])


def in_subprocess(side: str, args) -> dict:
    """Each side in a fresh process, as a user runs one or the other: neither inherits the other's heap."""
    cmd = [sys.executable, __file__, "--only", side, "--samples", str(args.samples),
           "--max-length", str(args.max_length), "--batch", str(args.batch)]
    start = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=160, help="rows trained on by each side (16 per step)")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16, choices=[1, 2, 4, 8, 16],
                    help="chattune per-device batch (x gradient accumulation = 16 samples per step)")
    ap.add_argument("--only", choices=["reference", "chattune"], help=argparse.SUPPRESS)  # one side, JSON on stdout
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_side(args.only, args)))
        return
    ref, ours = in_subprocess("reference", args), in_subprocess("chattune", args)
    ref_tps, our_tps = ref["real"] / ref["seconds"], ours["real"] / ours["seconds"]
    ref_loss, our_loss = tail_mean(ref["losses"]), tail_mean(ours["losses"])
    print(f"# train_speed — {args.samples} rows of {ref['source'].rsplit('/', 1)[-1]}, {ref['steps']} optimizer steps "
          f"x 16 samples, each side in its own process; {machine()}")
    print(f"tutorial recipe: {ref_tps:7.1f} real tokens/s  padding {1 - ref['real'] / ref['total']:5.1%}  "
          f"loss {ref_loss:.4f}  ({ref['seconds']:.0f}s)")
    print(f"chattune:        {our_tps:7.1f} real tokens/s  padding {1 - ours['real'] / ours['total']:5.1%}  "
          f"loss {our_loss:.4f}  ({ours['seconds']:.0f}s)")
    print(f"speed ratio {our_tps / ref_tps:.2f}x   loss difference {abs(our_loss - ref_loss) / ref_loss:.2%}")
    ref_on, our_on = after_first(ref), after_first(ours)
    print(f"after the first step (steps 2-{ref['steps']}): tutorial recipe {ref_on:.1f}, chattune {our_on:.1f} real "
          f"tokens/s, ratio {our_on / ref_on:.2f}x; first step {ref['step_seconds'][0]:.1f}s vs "
          f"{ours['step_seconds'][0]:.1f}s")
    print(f"whole process (interpreter, imports, loading, tokenising, steps, exit): tutorial recipe "
          f"{ref['process_seconds']:.1f}s, chattune {ours['process_seconds']:.1f}s, "
          f"ratio {ref['process_seconds'] / ours['process_seconds']:.2f}x")
    print(json.dumps({"ref_tokens_per_s": ref_tps, "chattune_tokens_per_s": our_tps, "ratio": our_tps / ref_tps,
                      "ratio_after_first_step": our_on / ref_on,
                      "process_seconds": [ref["process_seconds"], ours["process_seconds"]],
                      "ref_loss": ref_loss, "chattune_loss": our_loss, "ref_losses": ref["losses"],
                      "chattune_losses": ours["losses"]}))


if __name__ == "__main__":
    main()
