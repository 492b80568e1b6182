"""The tokenisation cache: a hit reproduces the samples exactly; any input that matters invalidates it."""

import pytest

from chattune.config import ModelConfig
from chattune.data import cache
from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer, render_all
from chattune.model.load import load_tokenizer

from ..conftest import qwen3_tokenizer_dir


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(load_tokenizer(qwen3_tokenizer_dir(), ModelConfig()), {"enable_thinking": False})


def convs(n=6):
    return [Conversation([{"role": "user", "content": f"question {i} " * (i + 1)},
                          {"role": "assistant", "content": f"answer {i}"}], f"f.json[{i}]") for i in range(n)]


def test_second_run_is_a_hit_with_identical_samples(tmp_path, renderer):
    a, stats_a, hit_a = cache.render_cached(renderer, convs(), cache_dir=tmp_path, max_length=64)
    b, stats_b, hit_b = cache.render_cached(renderer, convs(), cache_dir=tmp_path, max_length=64)
    assert (hit_a, hit_b) == (False, True)
    assert [(s.input_ids, s.labels, s.where) for s in a] == [(s.input_ids, s.labels, s.where) for s in b]
    assert stats_a == stats_b


@pytest.mark.parametrize("change", ["content", "max_length", "train_on", "template_kwargs", "template"])
def test_any_relevant_change_misses(tmp_path, renderer, change):
    cache.render_cached(renderer, convs(), cache_dir=tmp_path, max_length=64)
    data, kwargs, r = convs(), {"max_length": 64}, renderer
    if change == "content":
        data[3].messages[1]["content"] = "a different answer"
    elif change == "max_length":
        kwargs["max_length"] = 32
    elif change == "train_on":
        kwargs["train_on"] = "last_assistant"
    elif change == "template_kwargs":
        r = ChatRenderer(renderer.tokenizer, {})
    else:
        tok = load_tokenizer(qwen3_tokenizer_dir(), ModelConfig(chat_template="chatml"))
        r = ChatRenderer(tok)
    _, _, hit = cache.render_cached(r, data, cache_dir=tmp_path, **kwargs)
    assert not hit


def test_damaged_entry_is_rebuilt(tmp_path, renderer):
    cache.render_cached(renderer, convs(), cache_dir=tmp_path, max_length=64)
    (entry,) = tmp_path.glob("*.arrow")
    entry.write_bytes(b"not a zip file")
    samples, _, hit = cache.render_cached(renderer, convs(), cache_dir=tmp_path, max_length=64)
    assert not hit and len(samples) == 6


def test_no_cache_dir_means_no_files(tmp_path, renderer):
    _, _, hit = cache.render_cached(renderer, convs(), cache_dir=None, max_length=64)
    assert not hit and not list(tmp_path.iterdir())


def test_parallel_rendering_equals_serial(renderer, monkeypatch):
    monkeypatch.setattr(cache, "PARALLEL_MIN", 2)
    data = convs(9)
    data[4] = Conversation([{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y " * 200}], "long")
    par, par_stats = cache.render_parallel(renderer, data, workers=2, max_length=64)
    ser, ser_stats = render_all(renderer, data, max_length=64)
    assert [(s.input_ids, s.labels) for s in par] == [(s.input_ids, s.labels) for s in ser]
    assert par_stats == ser_stats and par_stats.truncated == 1


def test_parallel_rendering_equals_serial_with_uneven_chunks_and_many_turns(renderer, monkeypatch):
    monkeypatch.setattr(cache, "PARALLEL_MIN", 2)
    data = convs(10)
    data[7] = Conversation([{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                            {"role": "assistant", "content": "d"}], "multi")
    for workers in (3, 4):
        for train_on in ("all_assistant", "last_assistant"):
            par, par_stats = cache.render_parallel(renderer, data, workers=workers, max_length=64, train_on=train_on)
            ser, ser_stats = render_all(renderer, data, max_length=64, train_on=train_on)
            assert [(s.input_ids, s.labels, s.where) for s in par] == [(s.input_ids, s.labels, s.where) for s in ser]
            assert par_stats == ser_stats


def test_a_template_error_in_a_worker_reaches_the_caller(monkeypatch):
    import jinja2

    monkeypatch.setattr(cache, "PARALLEL_MIN", 2)
    tok = load_tokenizer(qwen3_tokenizer_dir(), ModelConfig())
    tok.chat_template = "{% if messages[-1]['content'] == 'answer 5' %}{{ raise_exception('bad row') }}{% endif %}x"
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad row"):
        cache.render_parallel(ChatRenderer(tok), convs(8), workers=2, max_length=64)


def test_entry_written_in_chunks_holds_what_render_all_gives(tmp_path, renderer, monkeypatch):
    monkeypatch.setattr(cache, "STORE_CHUNK", 4)  # 3 chunks of conversations, one of them short
    data = convs(10) + [Conversation([{"role": "user", "content": "long " * 80}, {"role": "assistant", "content": "ok"}],
                                     "f.json[10]")]  # with [7]-[9], its prompt alone fills max_length: dropped
    expected, expected_stats = render_all(renderer, data, max_length=40)
    for hit_expected in (False, True):
        samples, stats, hit = cache.render_cached(renderer, data, cache_dir=tmp_path, max_length=40)
        assert hit == hit_expected and type(samples).__name__ == "SampleStore"
        assert [(s.input_ids, s.labels, s.where) for s in samples] == \
            [(s.input_ids, s.labels, s.where) for s in expected]
        assert stats == expected_stats and stats.truncated and stats.dropped_no_labels == 3
        assert (samples[-1].where, [s.where for s in samples[2:4]]) == (expected[-1].where, ["f.json[2]", "f.json[3]"])


def test_half_written_entry_is_rebuilt(tmp_path, renderer):
    cache.render_cached(renderer, convs(), cache_dir=tmp_path, max_length=64)
    (entry,) = tmp_path.glob("*.arrow")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    samples, _, hit = cache.render_cached(renderer, convs(), cache_dir=tmp_path, max_length=64)
    assert not hit and [s.where for s in samples] == [f"f.json[{i}]" for i in range(6)]
