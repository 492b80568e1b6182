"""Screenshots of every tab of `chattune ui` for docs/images/, taken in headless Chromium as a new user would go:
switch to Chinese, pick configs/demo.yaml, look at a sample's supervised tokens, train, watch, chat base vs tuned.

    chattune ui --port 7861 &                     # in the repository root
    python -m tests.ui.screenshots --url http://127.0.0.1:7861/ --out docs/images

Trains configs/demo.yaml once (39 steps of SmolLM2-135M: minutes on a CPU) unless runs/demo is finished.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from tests.ui import browser as b


def shot(drv, out: Path, name: str, colours: int = 96) -> None:
    """A viewport screenshot, reduced to a small palette PNG."""
    from PIL import Image

    image = Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(out / f"ui-{name}.png", optimize=True)
    print("wrote", out / f"ui-{name}.png")


def scroll_to(drv, elem_id: str) -> None:
    drv.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'start'})", elem_id)


def tour(drv, out: Path, prompt: str, fields: list[str]) -> None:
    value = lambda eid: b.css(drv, f"#{eid} textarea, #{eid} input")[0].get_attribute("value")  # noqa: E731
    b.wait_for(lambda: value("f-output_dir") == "runs/demo", 60, "the demo preset in the form")
    next(lab for lab in b.css(drv, "#lang label") if "中文" in lab.text).click()
    b.wait_for(lambda: "配置" in [x.text for x in b.css(drv, "button[role='tab']")], 20, "Chinese labels")
    for item in fields:  # e.g. f-train-epochs=1: a field of an open section
        elem_id, text = item.split("=", 1)
        b.fill(drv, elem_id, text)
    b.click(drv, "validate")
    b.wait_for(lambda: b.css(drv, "[data-valid]"), 30, "the settings checked")
    drv.execute_script("window.scrollTo(0, 0)")
    shot(drv, out, "configure")
    scroll_to(drv, "command")
    shot(drv, out, "configure-yaml")
    b.click_tab(drv, "数据")
    b.click(drv, "check-data")
    b.wait_for(lambda: b.css(drv, "#check-report .hist"), 180, "the data check")
    shot(drv, out, "data")
    b.click(drv, "show-sample")
    b.wait_for(lambda: b.css(drv, "#sample-mask [data-eot]"), 60, "a sample's label mask")
    scroll_to(drv, "sample-mask")
    shot(drv, out, "data-sample")
    b.click_tab(drv, "训练")
    if not b.wait_for(lambda: b.css(drv, "#live [data-status]"), 30, "the run's state")[0].get_attribute(
            "data-status") == "finished":
        b.click(drv, "start")
        b.wait_for(lambda: b.css(drv, "#live [data-status='running']") and int(b.css(
            drv, "#live svg[data-chart='run-0-loss'] polyline")[0].get_attribute("data-points")) >= 2, 1200,
                   "a running training with points on the loss chart", every=2)
        shot(drv, out, "train-running")
        b.wait_for(lambda: b.css(drv, "#live [data-status='finished']"), 1800, "the demo to finish", every=2)
    shot(drv, out, "train")
    drv.execute_script("document.querySelector('#live table.predictions').scrollIntoView({block: 'center'})")
    shot(drv, out, "train-probes")
    b.click_tab(drv, "对话")
    b.fill(drv, "chat-max", "64")
    b.fill(drv, "chat-message", prompt)
    b.click(drv, "chat-send")
    b.wait_for(lambda: len(b.css(drv, "#flag-tuned [data-stopped], #flag-base [data-stopped]")) == 2, 300,
               "both answers")
    shot(drv, out, "chat")
    for name in ("evaluate", "export"):
        b.css(drv, f"button[role='tab'][data-tab-id='{name}']")[0].click()
        shot(drv, out, name)
    b.css(drv, "button[role='tab'][data-tab-id='runs']")[0].click()
    b.click(drv, "runs-refresh")
    b.wait_for(lambda: b.css(drv, "#runs-table table"), 60, "the runs table")
    shot(drv, out, "runs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:7861/")
    p.add_argument("--out", default="docs/images")
    p.add_argument("--prompt", default="Who are you?")
    p.add_argument("--field", action="append", default=[], metavar="ELEM_ID=TEXT",
                   help="type into a form field first, e.g. f-train-epochs=1 for a shorter run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drv = b.driver(1280, 860)
    try:
        drv.get(args.url)
        tour(drv, out, args.prompt, args.field)
    finally:
        drv.quit()


if __name__ == "__main__":
    main()
