"""The peer benchmark's table: one row per side, speed ratios against chattune, and the loss check.

Pure functions of the results the children wrote (peer_sides.py), so tests/tools/test_peers.py checks them
without training anything.
"""

from __future__ import annotations

from typing import Any

LOSS_TOLERANCE = 0.05  # every side's mean training loss within 5 % of chattune's at the same dtype
TOKEN_TOLERANCE = 0.01  # token counts further apart than 1 % mean the sides did not train on the same text



def tokens_per_s(r: dict[str, Any], epochs: float) -> float:
    """Real (non-padding) tokens trained per second of training."""
    return r["real_tokens"] * epochs / r["train_s"]


def mean_loss(r: dict[str, Any]) -> float:
    """The Trainer's mean training loss, or the mean of the logged losses where it gave none."""
    return r.get("train_loss") or sum(r["losses"]) / len(r["losses"])


def label(r: dict[str, Any]) -> str:
    return f"{r['side']} {r['dtype']}"


def reference_for(r: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The chattune row at r's dtype, else the first chattune row (None when chattune did not run)."""
    ours = [x for x in results if x["side"] == "chattune"]
    same = [x for x in ours if x["dtype"] == r["dtype"]]
    return (same or ours or [None])[0]


def speedups(r: dict[str, Any], results: list[dict[str, Any]], epochs: float) -> str:
    """How much faster chattune is than side r: against chattune's first (fastest-dtype) row and at r's dtype."""
    if r["side"] == "chattune":
        return "—"
    ours = [x for x in results if x["side"] == "chattune"]
    if not ours:
        return "n/a"
    head = tokens_per_s(ours[0], epochs) / tokens_per_s(r, epochs)
    same = reference_for(r, results)
    text = f"{head:.2f}× ({ours[0]['dtype']})"
    if same is not None and same is not ours[0]:
        text += f", {tokens_per_s(same, epochs) / tokens_per_s(r, epochs):.2f}× at {r['dtype']}"
    return text


def differences(r: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """What r did differently from ref that can move the loss: dtype, steps, the text trained on, the answer tokens."""
    why = []
    if r["dtype"] != ref["dtype"]:
        why.append(f"{r['dtype']} vs {ref['dtype']}")
    if r.get("steps") != ref.get("steps"):
        why.append(f"{r.get('steps')} optimizer steps vs {ref.get('steps')}")
    for key, what in (("real_tokens", "tokens (template or truncation)"), ("supervised_tokens", "answer tokens (label masking)")):
        gap = r[key] - ref[key]
        if abs(gap) > TOKEN_TOLERANCE * ref[key]:
            per_row = f" ({gap / r['rows']:+.2g} per row)" if r.get("rows") else ""
            why.append(f"{r[key]} {what} vs {ref[key]}{per_row}")
    return why


def loss_check(results: list[dict[str, Any]]) -> list[str]:
    """One line per side whose mean loss is off chattune's (same dtype) by more than LOSS_TOLERANCE, with why."""
    lines = []
    for r in results:
        ref = reference_for(r, results)
        if ref is None or ref is r:
            continue
        gap = mean_loss(r) / mean_loss(ref) - 1
        if abs(gap) > LOSS_TOLERANCE:
            why = differences(r, ref) or ["no difference in dtype, steps or tokens explains it"]
            lines.append(f"{label(r)}: mean loss {mean_loss(r):.4f} is {gap:+.1%} off {label(ref)}'s "
                         f"{mean_loss(ref):.4f}: {'; '.join(why)}")
    return lines


def token_check(results: list[dict[str, Any]]) -> list[str]:
    """One line per side that tokenised the rows into other tokens or answer tokens than chattune."""
    ours = [x for x in results if x["side"] == "chattune"]
    lines = []
    for r in results if ours else []:
        found = [x for x in differences(r, ours[0]) if "tokens" in x]
        if r["side"] == "chattune" or not found:
            continue
        lines.append(f"tokens: {label(r)}: " + "; ".join(found))
        if all(r[k] - ours[0][k] == r["rows"] for k in ("real_tokens", "supervised_tokens")):
            lines.append("  one answer token more per row: the newline ChatML puts after <|im_end|>, which this side "
                         "trains on and chattune leaves out (its samples end at <|im_end|>)")
    return lines


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def minutes(s: float) -> str:
    return f"{int(s // 60)}:{s % 60:04.1f}"


def dtype_cell(r: dict[str, Any]) -> str:
    """What the side trained in, as observed: the base weights' dtype and whether bf16 autocast was on."""
    weights = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(r["weights_dtype"], r["weights_dtype"])
    if r["autocast_bf16"] and weights != "bf16":
        return f"{weights} + bf16 autocast"
    if not r["autocast_bf16"] and weights == "bf16":
        return "bf16 weights, no autocast"
    return weights


def table(results: list[dict[str, Any]], epochs: float) -> list[str]:
    """The markdown table, one row per side, in run order."""
    lines = ["| side | dtype | steps | real tokens/s | train | wall (with start-up) | peak RSS | mean / final loss | chattune faster by |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['side']} | {dtype_cell(r)} | {r['steps']} | {tokens_per_s(r, epochs):.1f} | {r['train_s']:.1f} s "
                     f"| {minutes(r['wall_s'])} | {gib(r['peak_rss'])} | {mean_loss(r):.4f} / {r['losses'][-1]:.4f} "
                     f"| {speedups(r, results, epochs)} |")
    return lines


def footnotes(results: list[dict[str, Any]]) -> list[str]:
    """The token check and the loss check, as lines under the table."""
    notes = []
    tokens = token_check(results)
    notes += tokens or ["tokens: every side trained on the same tokens and the same answer tokens (within 1 %)"]
    losses = loss_check(results)
    if losses:
        notes += ["loss check: differs —"] + [f"  {line}" for line in losses]
    else:
        notes.append(f"loss check: every side's mean training loss is within {LOSS_TOLERANCE:.0%} of chattune's at the same dtype")
    return notes
