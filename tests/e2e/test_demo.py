"""End to end on the real SmolLM2-135M: the demo config teaches the persona, chat answers and stops."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chattune import cli

from ..conftest import check_run_directory

ROOT = Path(__file__).parents[2]
NAMES = ("Lumi", "露米")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, session_cache, smollm2_dir):
    out = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_CACHE", str(session_cache))
        mp.chdir(ROOT)
        assert cli.main(["train", "configs/demo.yaml", f"output_dir={out}"]) == 0
    return out


def rows(path):
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines()]


def test_persona_is_learned_on_unseen_questions(demo_run):
    before = rows(demo_run / "predictions" / "epoch_0.jsonl")
    after = rows(demo_run / "predictions" / "epoch_3.jsonl")
    assert len(before) == len(after) == 6
    # The probe questions are not in the training data (persona_probes.json is separate).
    train_q = {r["instruction"] for r in json.loads((ROOT / "src/chattune/resources/persona.json").read_text())}
    assert not train_q & {r["question"] for r in after}
    named = lambda rs: sum(any(n in r["answer"] for n in NAMES) for r in rs)
    assert named(before) == 0
    assert named(after) >= 5, [r["answer"] for r in after]


def test_training_lowers_the_loss(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["final_loss"] < 0.5 * summary["first_loss"]


def test_run_directory_holds_what_later_verbs_read(demo_run, smollm2_dir):
    """Keys of run_config.yaml / summary.json / metrics.jsonl, adapter shapes against the base model, the tokenizer."""
    check_run_directory(demo_run, smollm2_dir)


def test_chat_prompt_answers_in_persona_and_stops(demo_run, session_cache):
    env = {**os.environ, "CHATTUNE_CACHE": str(session_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "chattune.cli", "chat", str(demo_run), "--prompt", "What should I call you?",
         "--max-new-tokens", "64"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.strip()
    assert any(n in answer for n in NAMES), answer
    # Only the answer is on stdout, and it ended at the end-of-turn token well before the limit.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_run / "tokenizer")
    assert len(tok(answer)["input_ids"]) < 60
    assert "<|im_end|>" not in answer
