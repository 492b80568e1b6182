"""`chattune merge`: the file set, merged logits == adapter logits, a standalone folder that answers like the run."""

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from chattune import cli
from chattune.infer.generate import generate_batch
from chattune.infer.session import load_session, with_system

from .conftest import SYSTEM

QUESTION = "Hello there, who are you?"


def _merge(run, out, *extra):
    return cli.main(["merge", str(run), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    assert _merge(tiny_run, out) == 0
    assert torch.is_grad_enabled(), "no global grad switch left behind"
    return out


def _adapter_and_merged_logits(run, folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    session = load_session(run)
    ids = torch.tensor([session.renderer.ids(with_system([{"role": "user", "content": QUESTION},
                                                          {"role": "assistant", "content": "I am a bot."}], SYSTEM),
                                             generation_prompt=False)])
    with torch.inference_mode():
        adapter = session.model(input_ids=ids).logits.float()
        with session.model.disable_adapter():
            base = session.model(input_ids=ids).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        got = plain(input_ids=ids).logits.float()
    return adapter, base, got


def test_file_set(merged, tiny_run):
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "chattune.json"} <= names
    assert not [n for n in names if n.startswith("adapter")], "a standalone model, no adapter files"
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".")], "no temporary folders left behind"
    template = (tiny_run / "chat_template.jinja").read_text()
    assert (merged / "chat_template.jinja").read_text() == template
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == template
    eot = load_session(tiny_run, base_only=True).renderer.end_of_turn_ids()
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eot and 151645 in eot, "every end-of-turn id, <|im_end|> included"
    info = json.loads((merged / "chattune.json").read_text())
    assert info["system"] == SYSTEM and info["check"]["passed"]
    assert info["check"]["adapter_effect"] > 10 * info["check"]["tolerance"], "the check can tell merged from base"
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k] and f.get_tensor(next(iter(f.keys()))).dtype == torch.float32


def test_merged_logits_equal_adapter_logits(merged, tiny_run):
    adapter, base, got = _adapter_and_merged_logits(tiny_run, merged)
    assert (got - adapter).abs().max().item() < 1e-4
    assert (base - adapter).abs().max().item() > 1e-2, "the adapter must matter for this to mean anything"


def test_merged_folder_answers_like_chat(merged, tiny_run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    capsys.readouterr()
    assert cli.main(["chat", str(tiny_run), "--prompt", QUESTION, "--max-new-tokens", "12"]) == 0
    chat_answer = capsys.readouterr().out.strip()
    # Plain transformers only: the folder's own template and generation_config (its eos ids) do the rest.
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    inputs = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    plain_answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert plain_answer == chat_answer and chat_answer


def test_serving_the_merged_folder_answers_like_the_run(merged, tiny_run):
    import openai

    from chattune.verbs.serve import load_engine, make_server

    engine = load_engine(merged)
    assert engine.system == SYSTEM, "the training system prompt travels in chattune.json"
    server = make_server(engine, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none",
                               timeout=120, max_retries=0)
        got = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=12)
    finally:
        server.shutdown()
        server.server_close()
    session = load_session(tiny_run)
    want = generate_batch(session.model, session.renderer, [with_system([{"role": "user", "content": QUESTION}], SYSTEM)],
                          max_new_tokens=12)[0]
    assert got.choices[0].message.content == want


def test_shards_and_bf16(tiny_run, tmp_path, capsys):
    out = tmp_path / "bf16"
    capsys.readouterr()
    assert _merge(tiny_run, out, "--dtype", "bf16", "--max-shard-size", "2MB") == 0
    printed = capsys.readouterr().out
    assert "tolerance" in printed and "max |diff|" in printed
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    with safe_open(shards[0], "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    adapter, _, got = _adapter_and_merged_logits(tiny_run, out, dtype=torch.bfloat16)
    info = json.loads((out / "chattune.json").read_text())
    assert (got - adapter).abs().max().item() <= info["check"]["tolerance"]


def test_a_broken_merge_fails_loudly_and_writes_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    from peft.tuners.lora import LoraModel

    # Simulate a merge that loses the adapter: unload() drops the LoRA layers without folding them in.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kw: self.unload())
    out = tmp_path / "broken"
    capsys.readouterr()
    assert _merge(tiny_run, out) == 3
    captured = capsys.readouterr()
    assert "differ from the adapter model's" in captured.err and "Traceback" not in captured.err
    assert not out.exists() and not list(tmp_path.iterdir()), "no output and no temporary folder"


def test_out_folder_rules(tiny_run, merged, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _merge(tiny_run, foreign) == 2
    assert "not an earlier `chattune merge` output" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert _merge(tiny_run, tiny_run / "merged") == 2, "never inside the run directory"
    again = tmp_path / "again"
    shutil.copytree(merged, again)
    (again / "stale.safetensors").write_bytes(b"x")
    assert _merge(tiny_run, again) == 0, "an earlier merge is replaced"
    assert not (again / "stale.safetensors").exists()


def test_qlora_run_merges_onto_the_unquantised_base(tiny_run, tmp_path, capsys):
    run = tmp_path / "qrun"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = yaml.safe_load((run / "run_config.yaml").read_text())
    cfg["model"]["quantization"] = "4bit"
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert _merge(run, tmp_path / "qmerged") == 0
    printed = capsys.readouterr().out
    assert "QLoRA run" in printed and "unquantised base" in printed
    assert json.loads((tmp_path / "qmerged" / "chattune.json").read_text())["training_quantization"] == "4bit"


def test_max_shard_size_is_validated(tiny_run, tmp_path, capsys):
    assert _merge(tiny_run, tmp_path / "m", "--max-shard-size", "lots") == 2
    assert "is not a size" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_merge_keeps_the_answers(smollm2_dir, use_session_cache, tmp_path, capsys):
    """A real model: an adapter with random non-zero weights on SmolLM2, merged in its own bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = _fake_run(tmp_path / "run", smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(run / "adapter")
    del lora, base
    out = tmp_path / "merged"
    capsys.readouterr()
    assert _merge(run, out) == 0
    printed = capsys.readouterr().out
    assert "bfloat16" in printed and "max |diff|" in printed
    info = json.loads((out / "chattune.json").read_text())
    assert info["dtype"] == "bfloat16" and info["check"]["argmax_agreement"] > 0.9
    assert info["check"]["adapter_effect"] > info["check"]["tolerance"]


def _fake_run(run: Path, model_dir: Path) -> Path:
    """A run directory around an adapter made by hand (training SmolLM2 on a 2-core CPU would take minutes)."""
    from transformers import AutoTokenizer

    run.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(run / "tokenizer")
    (run / "chat_template.jinja").write_text(tok.chat_template)
    (run / "run_config.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["x.json"], "system": "You are helpful."}}))
    return run
