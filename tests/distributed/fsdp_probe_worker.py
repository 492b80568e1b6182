"""One CPU process (gloo, world size 1) shards a LoRA model with FSDP2 as accelerate does, answers probes the way
PredictionProbes does right after sharding, then takes a training step; prints one JSON line with what happened.

Run by tests/distributed/test_fsdp_probes.py and benchmarks/gpu_check_train.py (on a GPU: device cuda, nccl).
"""

import json
import os
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, device: str) -> dict:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers import AutoModelForCausalLM

    from chattune.config import LoraConfig, ModelConfig
    from chattune.data.formats import Conversation
    from chattune.data.render import ChatRenderer
    from chattune.model.load import load_tokenizer
    from chattune.model.lora import apply_lora
    from chattune.train.callbacks import PredictionProbes

    torch.manual_seed(0)
    tok = load_tokenizer(model_dir, ModelConfig(name_or_path=model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model = apply_lora(model, LoraConfig(r=4, dropout=0.0), gradient_checkpointing=False)
    mesh = init_device_mesh(device, (1,))
    for layer in model.base_model.model.model.layers:  # what accelerate's TRANSFORMER_BASED_WRAP shards
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "generate")  # as the Trainer does for FSDP2
    conv = Conversation([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}], "t")
    probes = PredictionProbes([conv],
                              ChatRenderer(tok, {}), out_dir=None, max_new_tokens=4, every_process=True)
    answers = probes.answer(model, 0, 0, write=False)
    model.train()
    ids = torch.randint(10, 1000, (1, 16), device=device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    dist.destroy_process_group()
    return {"answers": len(answers), "loss": float(loss), "lora_grads": sum(g is not None for g in grads),
            "lora_B": len(grads)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")))
