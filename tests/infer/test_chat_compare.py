"""`chattune chat --compare-base`: tuned and base answers side by side, one model loaded."""

import io

import torch

from chattune import cli
from chattune.infer.repl import repl
from chattune.infer.stream import LABELS
from chattune.infer.generate import generate_batch
from chattune.infer.session import load_session, with_system

from .conftest import SYSTEM

GEN = {"max_new_tokens": 8}


def _expected(run, question, *, base_only):
    session = load_session(run, base_only=base_only)
    return generate_batch(session.model, session.renderer, [with_system([{"role": "user", "content": question}], SYSTEM)],
                          **GEN)[0]


def test_prompt_compare_base_prints_tuned_then_base(tiny_run, capsys):
    capsys.readouterr()
    assert cli.main(["chat", str(tiny_run), "--prompt", "Hello there", "--max-new-tokens", "8", "--compare-base"]) == 0
    out = capsys.readouterr().out
    assert torch.is_grad_enabled(), "chat leaves the global grad mode as it found it"
    assert out.startswith(LABELS[0])
    tuned, _, base = out[len(LABELS[0]):].partition("\n" + LABELS[1])
    tuned, base = tuned.strip(), base.strip()
    assert tuned == _expected(tiny_run, "Hello there", base_only=False)
    assert base == _expected(tiny_run, "Hello there", base_only=True)
    assert tuned != base, "the adapter changes this answer, so the two columns must differ"


def test_repl_compare_base_keeps_the_adapter_on_for_the_tuned_answers(tiny_run):
    session = load_session(tiny_run)
    out = io.StringIO()
    repl(session, system=SYSTEM, inp=io.StringIO("Hello there\n/reset\nHello there\n/exit\n"), out=out,
              compare_base=True, **GEN)
    text = out.getvalue()
    # Answers of a random model may span lines: cut the transcript at the labels and prompts instead.
    turns = [t.split("\nyou> ")[0] for t in text.split(LABELS[0])[1:]]
    tuned = [t.partition("\n" + LABELS[1])[0].strip() for t in turns]
    base = [t.partition("\n" + LABELS[1])[2].strip() for t in turns]
    assert len(tuned) == len(base) == 2 and "(history cleared)" in text
    assert tuned[0] == tuned[1] == _expected(tiny_run, "Hello there", base_only=False)
    assert base[0] == base[1] == _expected(tiny_run, "Hello there", base_only=True)
