"""The fast paths give exactly what transformers gives: template text, token ids, rendered samples."""

import gc
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken

from chattune.config import ModelConfig
from chattune.data.fastpath import SegmentEncoder, TemplateText, plain_messages
from chattune.data.formats import Conversation
from chattune.data.render import ChatRenderer, gc_paused, render_all
from chattune.errors import TemplateError
from chattune.model.load import BUILTIN_TEMPLATES, load_tokenizer, read_template

from ..conftest import qwen3_tokenizer_dir
from .test_render import CASES, MULTI, SINGLE

MARKERS = {"glm4": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
           "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           "gemma": ["<bos>", "<start_of_turn>", "<end_of_turn>"]}
# Content that templates and tokenizers treat specially: whitespace at the edges, CJK, braces, markers.
ODD = [{"role": "system", "content": "  系统 {{ not jinja }} \n"},
       {"role": "user", "content": "\n\nwhat is <|im_end|> ?\t", "name": "alice"},
       {"role": "assistant", "content": " \n答案：42\n\n"},
       {"role": "user", "content": "<think>x</think>"},
       {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nfine"}]
ALL_CASES = {**CASES, "odd": ODD}


def qwen3(template: str | None = None):
    tok = load_tokenizer(qwen3_tokenizer_dir(), ModelConfig())
    if template is not None:
        tok.add_special_tokens({"additional_special_tokens": MARKERS.get(template, [])}, replace_extra_special_tokens=False)
        tok.chat_template = read_template(template)
    return tok


@pytest.fixture(scope="module")
def qwen3_tok():
    return qwen3()


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return load_tokenizer(smollm2_dir, ModelConfig())


def assert_same_texts(tok, kwargs=None):
    kwargs = kwargs or {}
    fast = TemplateText(tok, kwargs)
    assert fast.compiled is not None, "the fast path must be taken for plain conversations"
    for messages in ALL_CASES.values():
        for i in range(1, len(messages) + 1):
            for gen in (True, False):
                want = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=gen, **kwargs)
                assert fast(messages[:i], generation_prompt=gen) == want


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_packaged_templates_render_as_apply_chat_template(name):
    assert_same_texts(qwen3(name))


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": False}, {"enable_thinking": True}])
def test_qwen3_template_renders_as_apply_chat_template(qwen3_tok, kwargs):
    assert_same_texts(qwen3_tok, kwargs)


@pytest.mark.slow  # converts the packaged SmolLM2 model once for its tokenizer (~25 s)
def test_smollm2_template_renders_as_apply_chat_template(smol_tok):
    assert_same_texts(smol_tok)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "because"}],
    [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "q", "name": None}, {"role": "assistant", "content": "a"}],
    [],
])
def test_unusual_messages_go_through_apply_chat_template(qwen3_tok, messages):
    assert not plain_messages(messages)
    fast = TemplateText(qwen3_tok, {})
    assert outcome(lambda: fast(messages, generation_prompt=False)) == outcome(
        lambda: qwen3_tok.apply_chat_template(messages, tokenize=False))


def outcome(fn):
    """The text, or the type of the exception: both paths must agree on either."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc)


def test_kwargs_that_apply_chat_template_takes_itself_disable_the_fast_path(qwen3_tok):
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}]
    fast = TemplateText(qwen3_tok, {"tools": tools})
    assert fast.compiled is None
    want = qwen3_tok.apply_chat_template(SINGLE, tokenize=False, tools=tools)
    assert fast(SINGLE, generation_prompt=False) == want and "<tools>" in want


def test_renderer_follows_a_changed_template():
    tok = qwen3()
    r = ChatRenderer(tok)
    before = r.text(SINGLE, generation_prompt=False)
    tok.chat_template = read_template("llama3")
    after = r.text(SINGLE, generation_prompt=False)
    assert after != before and after == tok.apply_chat_template(SINGLE, tokenize=False)


# -- token ids -----------------------------------------------------------------

def special_texts(tok):
    specials = [t.content for t in tok.added_tokens_decoder.values()][:8]
    return ["", " ", "\n\n", "plain text", "中文，标点。", specials[0], "".join(specials), " ".join(specials) + " ",
            f"a{specials[1]}b{specials[2]}\n{specials[1]}  c", f"  {specials[0]}\n\n{specials[0]}\t",
            "emoji 👍🏽 and combining e\u0301 and NFC é"]


@pytest.mark.parametrize("which", ["qwen3", "smol"])
def test_piecewise_ids_equal_the_tokenizer(request, which):
    tok = request.getfixturevalue(f"{which}_tok")
    enc = SegmentEncoder(tok)
    texts = special_texts(tok)
    texts += [ChatRenderer(tok).text(m, generation_prompt=False) for m in ALL_CASES.values()]
    assert enc(texts) == tok(texts, add_special_tokens=False)["input_ids"]
    assert enc.why_not is None, "these tokenizers must take the fast path"


TEXT = st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>", "\n", " ", "  ",
                                 "<|im", "end|>", "<", "|", ">"]) | st.text(st.characters(exclude_categories=("Cs",)), max_size=6), max_size=12).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=12))
def test_piecewise_ids_equal_the_tokenizer_on_any_text(qwen3_tok, texts):
    assert SegmentEncoder(qwen3_tok)(texts) == qwen3_tok(texts, add_special_tokens=False)["input_ids"]


def test_padding_or_truncation_left_on_the_tokenizer_does_not_leak(qwen3_tok):
    qwen3_tok(["a", "b c d e f"], padding=True, truncation=True, max_length=3)
    texts = ["one two three four five six", "x"]
    assert SegmentEncoder(qwen3_tok)(texts) == [qwen3_tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_tokenizers_with_context_dependent_pieces_use_the_plain_call():
    tok = qwen3()
    tok.add_tokens([AddedToken("<|im", normalized=False)])  # overlaps <|im_start|>: matches would depend on the order
    enc = SegmentEncoder(tok)
    texts = ["<|im_start|>user\nhi<|im_end|>", "<|im x"]
    assert enc(texts) == tok(texts, add_special_tokens=False)["input_ids"] and enc.why_not == "added tokens that overlap"


@pytest.mark.parametrize("token,why", [(AddedToken("<x>", lstrip=True), "strip"), (AddedToken("<x>", normalized=True), "normalized")])
def test_added_tokens_that_depend_on_their_surroundings_use_the_plain_call(token, why):
    tok = qwen3()
    tok.add_tokens([token])
    enc = SegmentEncoder(tok)
    texts = ["a <x> b", "<x>", " \n<x>\n"]
    assert enc(texts) == tok(texts, add_special_tokens=False)["input_ids"] and why in enc.why_not


def test_a_disagreeing_check_turns_the_fast_path_off(qwen3_tok, caplog):
    enc = SegmentEncoder(qwen3_tok)
    texts = ["first text", "second text"]
    enc(texts)
    enc.splitter = re.compile("(e)")  # splits words mid-way: piecewise ids would differ
    assert enc(texts) == qwen3_tok(texts, add_special_tokens=False)["input_ids"]
    assert enc.why_not and "different ids" in caplog.text
    enc(["again"])
    assert enc.why_not, "once off, it stays off for this tokenizer"


# -- whole renders ------------------------------------------------------------

def slow_renderer(tok, kwargs=None):
    r = ChatRenderer(tok, kwargs)
    r._template_text.compiled = None
    r._template_text._key = (tok.chat_template, dict(tok.special_tokens_map), dict(r.template_kwargs))
    r._encoder._disabled = "test"
    r._encoder._setup_key = None
    return r


@pytest.mark.parametrize("which,kwargs", [("qwen3", None), ("qwen3", {"enable_thinking": False}), ("smol", None)])
def test_rendered_samples_equal_the_transformers_path(request, which, kwargs):
    tok = request.getfixturevalue(f"{which}_tok")
    convs = [Conversation(m, k) for k, m in ALL_CASES.items()] + [Conversation(SINGLE, "again"), Conversation(MULTI, "m")]
    if kwargs:  # with thinking off, Qwen3's prompt ends in an empty think block that ODD's answer does not continue
        with pytest.raises(TemplateError):
            render_all(slow_renderer(tok, kwargs), [Conversation(ODD, "odd")], max_length=40)
        convs = [c for c in convs if c.where != "odd"]
    for train_on in ("all_assistant", "last_assistant"):
        fast, _ = render_all(ChatRenderer(tok, kwargs), convs, max_length=40, train_on=train_on)
        slow, _ = render_all(slow_renderer(tok, kwargs), convs, max_length=40, train_on=train_on)
        assert [(s.input_ids, s.labels, s.where) for s in fast] == [(s.input_ids, s.labels, s.where) for s in slow]


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError
    assert gc.isenabled()


def test_chunked_rendering_equals_one_batch(qwen3_tok, monkeypatch):
    from chattune.data import render

    convs = [Conversation(m, f"{k}{i}") for i in range(3) for k, m in CASES.items()]
    whole, _ = render_all(slow_renderer(qwen3_tok), convs, max_length=64)
    monkeypatch.setattr(render, "RENDER_CHUNK", 2)  # pieces repeat across chunks: each still encoded once
    chunked, _ = render_all(ChatRenderer(qwen3_tok), convs, max_length=64)
    assert [(s.input_ids, s.labels, s.where) for s in chunked] == [(s.input_ids, s.labels, s.where) for s in whole]


def test_encode_chunks_keeps_order_across_chunks(qwen3_tok):
    chunks = [["<|im_start|>a", "b<|im_end|>"], [], ["<|im_start|>a", "c"], ["b<|im_end|>"]]
    flat = [t for c in chunks for t in c]
    assert SegmentEncoder(qwen3_tok).encode_chunks(iter(chunks)) == qwen3_tok(flat, add_special_tokens=False)["input_ids"]


def test_a_messages_template_kwarg_fails_as_apply_chat_template_does(qwen3_tok):
    fast = TemplateText(qwen3_tok, {"messages": []})
    assert fast.compiled is None
    assert outcome(lambda: fast(SINGLE, generation_prompt=False)) == outcome(
        lambda: qwen3_tok.apply_chat_template(SINGLE, tokenize=False, messages=[]))


def test_a_conversation_that_opens_with_the_assistant_fails_as_before(qwen3_tok):
    conv = Conversation([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}], "x")
    assert outcome(lambda: ChatRenderer(qwen3_tok).render(conv)) == outcome(lambda: slow_renderer(qwen3_tok).render(conv))


def test_template_errors_surface_from_the_fast_path(qwen3_tok):
    tok = qwen3()
    tok.chat_template = "{% for m in messages %}{{ raise_exception('no ' + m['role']) }}{% endfor %}"
    with pytest.raises(Exception, match="no user") as fast:
        ChatRenderer(tok).text(SINGLE, generation_prompt=True)
    with pytest.raises(Exception, match="no user") as slow:
        tok.apply_chat_template(SINGLE, tokenize=False)
    assert type(fast.value) is type(slow.value)
