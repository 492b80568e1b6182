"""`chattune export`'s fast parts: quant list, Ollama templates against the training templates, GGUF chat
metadata, the parity verdict, converter installation, and each bad input's error (no llama.cpp needed)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest

from chattune import cli
from chattune.errors import ConfigError, ModelError, RunDirError, TemplateError
from chattune.export import gguf_build, llamacpp
from chattune.export.gguf_meta import read_chat_metadata, write_chat_metadata
from chattune.export.ollama import LAYOUTS, match_layout, modelfile
from chattune.export.parity import Answer, compare, likely_cause
from chattune.export.quants import QUANTS, get_quant

from . import gotemplate

TEMPLATES = Path(__file__).parents[2] / "src/chattune/model/templates"
SYSTEM = "You are Lumi, a cheerful guide."


def jinja_renderer(template: str):
    """Render like transformers' apply_chat_template (trim_blocks, lstrip_blocks), with a generation prompt."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string(template)
    return lambda messages: tpl.render(messages=messages, add_generation_prompt=True, bos_token="<bos>")


# ---------------------------------------------------------------- quants


def test_unknown_quant_lists_every_supported_one():
    with pytest.raises(ConfigError) as e:
        get_quant("q9_9")
    text = e.value.render()
    assert "q9_9" in text and all(name in text for name in QUANTS)
    assert get_quant("Q4_K_M").ftype == 15 and get_quant("f16").is_float and not get_quant("q8_0").is_float


# ---------------------------------------------------------------- Ollama


CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke."}],
]


@pytest.mark.parametrize("template, layout, bos", [("chatml", "ChatML", None), ("llama3", "Llama 3", "<|begin_of_text|>"),
                                                   ("gemma", "Gemma", "<bos>"), ("glm4", "GLM-4", None)])
def test_each_builtin_template_becomes_a_go_template_that_renders_the_same(template, layout, bos):
    render = jinja_renderer((TEMPLATES / f"{template}.jinja").read_text())
    found, system = match_layout(render, SYSTEM, bos)
    assert found.name == layout and system == SYSTEM
    for msgs in CONVERSATIONS:  # Ollama's own template engine semantics, run on the Go text
        want = render(msgs)
        want = want[len(bos):] if bos and want.startswith(bos) else want
        go = gotemplate.render(found.go, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]})
        assert go == want


def test_chatml_default_system_prompt_becomes_system_when_training_had_none():
    render = jinja_renderer((TEMPLATES / "chatml.jinja").read_text())
    layout, system = match_layout(render, None, None)
    assert layout.name == "ChatML" and system == "You are a helpful assistant."


def test_a_template_ollama_cannot_express_names_the_closest_layout():
    alpaca = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}### assistant:\n"
    with pytest.raises(TemplateError) as e:
        match_layout(jinja_renderer(alpaca), SYSTEM, None)
    assert "cannot be written as an Ollama TEMPLATE" in e.value.render() and "closest" in e.value.render()


def test_modelfile_has_from_template_system_and_a_stop_per_end_of_turn():
    layout = next(x for x in LAYOUTS if x.name == "GLM-4")
    text = modelfile("demo-q8_0.gguf", layout, SYSTEM, ["<|user|>", "<|endoftext|>", "<|user|>"])
    lines = text.splitlines()
    assert "FROM ./demo-q8_0.gguf" in lines and f'SYSTEM """{SYSTEM}"""' in lines
    assert [x for x in lines if x.startswith("PARAMETER stop")] == ['PARAMETER stop "<|user|>"',
                                                                   'PARAMETER stop "<|endoftext|>"']
    assert f'TEMPLATE """{layout.go}"""' in text
    with pytest.raises(TemplateError):
        modelfile("x.gguf", layout, 'say """hi"""', ["<|user|>"])


# ---------------------------------------------------------------- GGUF chat metadata


def _tiny_gguf(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint32("llama.block_count", 1)
    w.add_token_list(["<unk>", "<s>", "</s>", "<|im_end|>", "hi"])
    w.add_eos_token_id(2)
    w.add_chat_template("{{ 'base template' }}")
    w.add_tensor("tok_embd.weight", np.arange(20, dtype=np.float32).reshape(5, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_chat_metadata_is_replaced_and_everything_else_kept(tmp_path):
    src, dst = tmp_path / "a.gguf", tmp_path / "b.gguf"
    _tiny_gguf(src)
    write_chat_metadata(src, dst, "{{ 'run template' }}", [3, 2])
    meta = read_chat_metadata(dst)
    assert (meta.chat_template, meta.eot, meta.eos, meta.architecture) == ("{{ 'run template' }}", 3, 2, "llama")
    assert meta.token_texts == {2: "</s>", 3: "<|im_end|>"}
    r = gguf.GGUFReader(str(dst))
    assert r.fields["llama.block_count"].contents() == 1
    (t,) = r.tensors
    assert np.array_equal(np.asarray(t.data).reshape(-1), np.arange(20, dtype=np.float32))
    gguf_build.check_metadata(meta, "{{ 'run template' }}", [3, 2], dst)
    with pytest.raises(Exception, match="lost its chat metadata"):
        gguf_build.check_metadata(meta, "{{ 'other' }}", [3, 2], dst)


# ---------------------------------------------------------------- parity verdict


def _answer(text, ids, stopped, prompt="p"):
    return Answer(text, ids, stopped, [1, 2], prompt)


def test_parity_agreement_stops_and_likely_cause():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(10)]
    ours = [_answer(f"a{i}", [i, 1], True) for i in range(10)]
    same = compare(prompts, ours, [_answer(f"a{i}", [i, 1], True) for i in range(10)], strict=True)
    assert same["agreement"] == 1.0 and same["passed"] and same["llama_cpp_stop_rate"] == 1.0
    one_off = [_answer(f"a{i}", [i, 1], True) for i in range(9)] + [_answer("x", [9, 7], True)]
    r = compare(prompts, ours, one_off, strict=True)
    assert r["agreement"] == 0.9 and r["passed"] and r["rows"][9]["matching_tokens"] == 1
    runaway = [_answer(f"a{i}", [i, 1], i != 3) for i in range(10)]
    r = compare(prompts, ours, runaway, strict=True)
    assert r["passed"] is False and likely_cause(r).startswith("stop ids")
    quant = compare(prompts, ours, runaway, strict=False)
    assert quant["passed"] is None and quant["llama_cpp_stop_rate"] == 0.9
    other_prompt = [_answer(f"a{i}", [i, 1], True, prompt="q") for i in range(10)]
    assert likely_cause(compare(prompts, ours, other_prompt, strict=True)).startswith("template")


def test_a_near_tie_among_few_probes_points_to_more_probes():
    # huanhuan, 1 epoch on smollm2: 4 of the run's 5 probes agreed at f16 (one near-tie), 28 of 30 with --check-data
    def numerics(n, differing):
        prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(n)]
        ours = [_answer(f"a{i}", [i, 1], False) for i in range(n)]
        theirs = [_answer("x" if i < differing else f"a{i}", [i, 7] if i < differing else [i, 1], False)
                  for i in range(n)]
        return likely_cause(compare(prompts, ours, theirs, strict=True))

    few = numerics(5, 1)
    assert few.startswith("numerics") and "with 5 probes one near-tie fails" in few and "--check-limit" in few
    many = numerics(20, 3)  # 85 %: failing with enough probes is not explained by one near-tie
    assert many.startswith("numerics") and "--check-limit" not in many


# ---------------------------------------------------------------- converter installation


def _sdist(tmp_path: Path, version: str) -> Path:
    path = tmp_path / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {"convert_hf_to_gguf.py": "print('hi')\n",
                           "conversion/__init__.py": "TEXT_MODEL_MAP: dict[str, str] = {\"LlamaForCausalLM\": \"llama\"}\n",
                           "gguf-py/gguf/__init__.py": "", "ggml/src/big.c": "int x;\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-{version}/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_converter_is_installed_from_the_source_archive_and_must_match_the_runtime(tmp_path, monkeypatch):
    dest = llamacpp.install_converter(_sdist(tmp_path, "9.9.9"), tmp_path / "conv")
    assert (dest / "VERSION").read_text().strip() == "9.9.9" and (dest / "gguf-py/gguf/__init__.py").is_file()
    assert not (dest / "ggml").exists(), "only the converter's parts are copied"
    assert llamacpp.supported_architectures(dest) == {"LlamaForCausalLM"}
    with pytest.raises(ModelError, match="9.9.9.*does not support the architecture FooForCausalLM"):
        llamacpp.check_architecture(["FooForCausalLM"], dest, "9.9.9", where="config.json")
    monkeypatch.setattr(llamacpp, "runtime_version", lambda: "1.0.0")
    monkeypatch.setattr(llamacpp, "default_converter_dir", lambda: dest)
    with pytest.raises(ImportError) as e:
        llamacpp.converter_dir()
    assert "from llama-cpp-python 9.9.9 but the runtime is 1.0.0" in str(e.value) and "pip download" in str(e.value)


def test_disk_space_is_checked_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_build.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2**20})())
    need = gguf_build.needed_bytes(135_000_000, "bfloat16", get_quant("q8_0"))
    assert need > 135_000_000 * 2 * 3
    with pytest.raises(RunDirError, match="not enough disk space"):
        gguf_build.check_disk_space(tmp_path / "a" / "b", need)
    gguf_build.check_disk_space(tmp_path, 1)


# ---------------------------------------------------------------- bad input through the CLI


def _run_dir(tmp_path: Path, *, adapter: bool, finished: bool) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text("model:\n  name_or_path: smollm2-135m\ndata:\n  train: x.json\n")
    if adapter:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text("{}")
    if finished:
        (run / "summary.json").write_text("{}")
    return run


@pytest.mark.parametrize("adapter, finished, message", [(False, False, "no adapter"), (True, False, "not finished")])
def test_unfinished_runs_are_refused(tmp_path, capsys, adapter, finished, message):
    assert cli.main(["export", str(_run_dir(tmp_path, adapter=adapter, finished=finished))]) == 2
    assert message in capsys.readouterr().err


def test_unknown_quant_and_missing_llama_cpp_exit_2(tmp_path, capsys, monkeypatch):
    run = _run_dir(tmp_path, adapter=True, finished=True)
    assert cli.main(["export", str(run), "--quant", "q9"]) == 2
    assert "q4_k_m" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert cli.main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "pip install 'chattune[gguf]'" in err


def test_existing_export_needs_overwrite(tmp_path, capsys, monkeypatch):
    from chattune.verbs import export

    run = _run_dir(tmp_path, adapter=True, finished=True)
    (run / "export" / "f16").mkdir(parents=True)
    with pytest.raises(RunDirError, match="already exists"):
        export.export_folder(export.RunDir(run), None, "f16", overwrite=False)
    assert export.export_folder(export.RunDir(run), None, "f16", overwrite=True) == (run / "export" / "f16").resolve()
    assert json.loads(json.dumps(export.slug("My Run_1!"))) == "my-run_1"


def test_a_bos_that_is_also_the_turn_opener_is_kept():
    # SmolLM2's tokenizer names <|im_start|> as its bos: the ChatML text must not lose it.
    render = jinja_renderer((TEMPLATES / "chatml.jinja").read_text())
    assert match_layout(render, SYSTEM, "<|im_start|>")[0].name == "ChatML"
    assert match_layout(render, None, "<|im_start|>") == (LAYOUTS[0], "You are a helpful assistant.")
