"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (Go template), SYSTEM, one PARAMETER stop per end-of-turn.

Ollama does not run the Jinja template embedded in the GGUF: it needs its own Go template. chattune
knows four turn layouts (ChatML, Llama 3, Gemma, GLM-4). Each is written twice here, as the Go
template Ollama runs and as the same rules in Python (`render`); the run's own template is rendered on
a few probe conversations and must match one layout's Python rendering exactly, or the export stops
naming what differs. So the TEMPLATE line is the run's template, not a guess from a token name.

Ollama puts the Modelfile's SYSTEM first in .Messages as a "system" message, and adds the GGUF's BOS
itself when the GGUF asks for one (add_bos_token), so no TEMPLATE below writes a BOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from chattune.errors import TemplateError

Messages = list[dict[str, str]]
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
_OPEN = '(ne $m.Role "assistant")'  # a last assistant message stays open: Ollama continues it


def _chatml(messages: Messages, gen: bool) -> str:
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if gen else "")


def _llama3(messages: Messages, gen: bool) -> str:
    out = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                  for m in messages)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


def _gemma(messages: Messages, gen: bool) -> str:
    out, system = "", ""
    for m in messages:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
            continue
        role = "model" if m["role"] == "assistant" else "user"
        out += f"<start_of_turn>{role}\n{system}{m['content'].strip()}<end_of_turn>\n"
        system = ""
    return out + ("<start_of_turn>model\n" if gen else "")


def _glm4(messages: Messages, gen: bool) -> str:
    out = "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
    return out + ("<|assistant|>\n" if gen else "")


@dataclass(frozen=True)
class Layout:
    name: str
    render: Callable[[Messages, bool], str]
    go: str  # Ollama's TEMPLATE, the same rules as render()


LAYOUTS = [
    Layout("ChatML", _chatml,
           "{{- range $i, $m := .Messages }}" + _LAST + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}"
           "{{ if or " + _OPEN + " (not $last) }}<|im_end|>\n{{ end }}"
           "{{ if and $last " + _OPEN + " }}<|im_start|>assistant\n{{ end }}{{ end }}"),
    Layout("Llama 3", _llama3,
           "{{- range $i, $m := .Messages }}" + _LAST + "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n"
           "{{ $m.Content }}{{ if or " + _OPEN + " (not $last) }}<|eot_id|>{{ end }}"
           "{{ if and $last " + _OPEN + " }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}{{ end }}"),
    Layout("Gemma", _gemma,
           '{{- $system := "" }}{{- range $i, $m := .Messages }}' + _LAST +
           '{{- if eq $m.Role "system" }}{{ $system = printf "%s\\n\\n" $m.Content }}'
           '{{- else }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}user{{ end }}\n'
           '{{ $system }}{{ $m.Content }}{{ $system = "" }}{{ if or ' + _OPEN + ' (not $last) }}<end_of_turn>\n{{ end }}'
           '{{ if and $last ' + _OPEN + ' }}<start_of_turn>model\n{{ end }}{{ end }}{{ end }}'),
    Layout("GLM-4", _glm4,
           "[gMASK]<sop>{{ range $i, $m := .Messages }}" + _LAST + "<|{{ $m.Role }}|>\n{{ $m.Content }}"
           "{{ if and $last " + _OPEN + " }}<|assistant|>\n{{ end }}{{ end }}"),
]

_PROBES: list[Messages] = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
]


def _with_system(messages: Messages, system: str | None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + messages


def _strip_bos(text: str, bos_text: str | None) -> str:
    # Ollama adds the BOS itself from the GGUF's add_bos_token; none of the layouts writes it. (SmolLM2's bos
    # is <|im_start|> itself: a rendered text that still parses as a layout keeps it.)
    if bos_text and text.startswith(bos_text) and not text.startswith(bos_text * 2) and _implied_system(text) is None:
        return text[len(bos_text):]
    return text


def _implied_system(rendered: str) -> str | None:
    """The default system prompt a template wrote into a conversation that had none (ChatML's), if any."""
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", rendered, flags=re.S)
    return m.group(1) if m else None


def match_layout(render_run: Callable[[Messages], str], system: str | None,
                 bos_text: str | None) -> tuple[Layout, str | None]:
    """(layout, SYSTEM line) whose rules reproduce the run's template, generation prompt included, on every probe.

    Without a training system prompt, a template's own default system prompt (ChatML's) becomes SYSTEM.
    """
    if system is None:
        system = _implied_system(_strip_bos(render_run(_PROBES[0]), bos_text))
    closest: tuple[int, Layout, str, str] | None = None
    for layout in LAYOUTS:
        for probe in _PROBES:
            msgs = _with_system(probe, system)
            want, got = render_run(msgs), layout.render(msgs, True)
            if want != got and bos_text and want.startswith(bos_text) and not got.startswith(bos_text):
                want = want[len(bos_text):]  # a BOS the template writes: Ollama adds it (the GGUF's add_bos_token)
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                if closest is None or at > closest[0]:
                    closest = (at, layout, want[max(0, at - 20):at + 30], got[max(0, at - 20):at + 30])
                break
        else:
            return layout, system
    at, layout, want, got = closest
    raise TemplateError(
        f"the run's chat template cannot be written as an Ollama TEMPLATE: it follows none of the layouts chattune "
        f"can express ({', '.join(x.name for x in LAYOUTS)}); the closest, {layout.name}, differs at character {at}: "
        f"the run's template gives {want!r} where {layout.name} gives {got!r}", where="chat_template.jinja",
        fix="export with --to gguf (the GGUF carries the exact template for llama.cpp and LM Studio) and write the "
            "Modelfile's TEMPLATE by hand, or train with one of those templates (model.chat_template)")


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise TemplateError(f"the {what} contains three double quotes in a row, which a Modelfile cannot hold",
                            where="Modelfile", fix=f"remove them from the {what}")
    return f'"""{text}"""'


def modelfile(gguf_name: str, layout: Layout, system: str | None, stops: list[str]) -> str:
    """The Modelfile text: FROM ./file.gguf, TEMPLATE, SYSTEM, PARAMETER stop per end-of-turn token."""
    lines = [f"# Written by `chattune export`; template layout: {layout.name}", f"FROM ./{gguf_name}",
             f"TEMPLATE {_quoted(layout.go, 'template')}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    for stop in dict.fromkeys(stops):
        if '"' in stop or "\n" in stop:
            raise TemplateError(f"the stop token {stop!r} cannot be written as a PARAMETER stop", where="Modelfile",
                                fix="use a template whose end-of-turn token is a plain special token")
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
