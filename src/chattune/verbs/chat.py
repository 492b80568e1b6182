"""`chattune chat`: a streaming multi-turn REPL, or one answer with --prompt."""

from __future__ import annotations

import sys
from typing import TextIO

import torch

from chattune.infer.session import Session, load_session, with_system
from chattune.infer.stream import answer_both, stream_answer, stream_labelled
from chattune.options import CHAT

HELP = "commands: /reset clears the history, /system TEXT sets the system prompt, /exit quits"


def answer_once(session: Session, prompt: str, *, system: str | None, out: TextIO | None = None,
                compare_base: bool = False, **gen) -> str:
    """Print only the answer to one prompt (for scripts) and return it; with compare_base, the base's answer too."""
    out = out or sys.stdout  # looked up per call: a default bound at import time would ignore later redirection
    messages = with_system([{"role": "user", "content": prompt}], system)
    if compare_base:
        return answer_both(session, messages, out=out, **gen)
    return stream_labelled(session, messages, "", out, **gen)


def repl(session: Session, *, system: str | None, inp: TextIO | None = None, out: TextIO | None = None,
         compare_base: bool = False, **gen) -> None:
    """Read a line, stream the answer, keep the history; /reset, /system, /exit."""
    inp, out = inp or sys.stdin, out or sys.stdout
    history: list[dict[str, str]] = []
    out.write(f"chatting with {session.run_dir.root} — {HELP}\n")
    while True:
        out.write("\nyou> ")
        out.flush()
        line = inp.readline()
        if not line:
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            out.write(f"(system prompt {'set' if system else 'cleared'}; history cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command — {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        if compare_base:  # the tuned answer stays in the history; the base answers the same history
            reply = answer_both(session, with_system(history, system), out=out, **gen)
            history.append({"role": "assistant", "content": reply})
            continue
        out.write("bot> ")
        parts = []
        for piece in stream_answer(session, with_system(history, system), **gen):
            out.write(piece)
            out.flush()
            parts.append(piece)
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(parts).strip()})


def run(run_path: str, *, prompt: str | None = CHAT.prompt, system: str | None = CHAT.system,
        compare_base: bool = CHAT.compare_base, **gen) -> None:
    """Entry point of `chattune chat`."""
    # A context, not torch.set_grad_enabled(False): a global switch would outlive the call (and break a later
    # training in the same process, e.g. in tests). Generation threads use inference_mode themselves.
    with torch.no_grad():
        session = load_session(run_path)
        system = system if system is not None else session.system
        if prompt is not None:
            answer_once(session, prompt, system=system, compare_base=compare_base, **gen)
        else:
            repl(session, system=system, compare_base=compare_base, **gen)
