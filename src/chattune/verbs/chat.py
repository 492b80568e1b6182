"""`chattune chat`: a streaming multi-turn REPL, or one answer with --prompt (the loop is infer/repl.py)."""

from __future__ import annotations

import torch

from chattune.infer.repl import answer_once, repl
from chattune.infer.session import load_session
from chattune.options import CHAT


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
