"""The studio in a real browser (issue 27): on a desktop and on a 375-px touch screen, the whole
loop on a tiny model — paste, start, the chart gets points, a pinned sample, stop, resume to the
end, a second run, compare the two, generate and look at attention — with no console error.
TINYGPT_STUDIO_SHOTS=DIR keeps a screenshot of each step (the Studio guide's pictures)."""

import os
from pathlib import Path

import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, TINY_TEXT, needs_chromium
from test_studio import TOKEN, studio

BROWSER_SETTINGS = {"n_layer": "1", "n_head": "2", "n_embd": "48", "block_size": "16", "batch_size": "8",
                    "eval_iters": "2", "eval_interval": "50", "max_iters": "3000", "dropout": "0"}


def fill_settings(page, values: dict) -> None:
    if not page.locator("#advanced").evaluate("d => d.open"):
        page.click("#advanced summary")
    for name, value in values.items():
        page.fill(f"#set-{name}", value)
    page.select_option("#set-dtype", "float32")
    page.select_option("#set-device", "cpu")


@needs_chromium
@pytest.mark.slow
@pytest.mark.parametrize("width,height", [(1100, 820), (375, 740)], ids=["desktop", "phone"])
def test_the_whole_loop_in_chromium(tmp_path, width, height):
    from playwright.sync_api import expect, sync_playwright

    phone = width < 600
    shots = Path(os.environ["TINYGPT_STUDIO_SHOTS"]) if os.environ.get("TINYGPT_STUDIO_SHOTS") else None
    kind = "phone" if phone else "desktop"

    def shot(page, name):
        if shots:
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / f"studio-{name}-{kind}.png"), full_page=not phone)

    errors = []
    runs = tmp_path / "runs"
    with studio(runs) as s, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, has_touch=phone, is_mobile=phone)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{s.url}/?token={TOKEN}")
            expect(page.locator(".steps button[aria-current=page]")).to_have_text("1 Text")
            assert "token" not in page.url  # it left the address bar

            # 1. text: pasted, described at once
            page.fill("#paste", TINY_TEXT)
            page.fill("#paste-name", "citizens")
            page.click("#use-paste")
            expect(page.locator("#f-vocab")).to_have_text("34 characters")
            expect(page.locator("#f-split")).to_have_text(f"{len(TINY_TEXT) - len(TINY_TEXT) // 10:,} / "
                                                          f"{len(TINY_TEXT) // 10:,}")
            expect(page.locator("#f-bigram")).to_contain_text("nats")
            shot(page, "text")

            # 2. model: presets with parameters and time measured here; advanced settings checked
            page.click("text=Next: choose a model")
            expect(page.locator("#est-cpu-quick")).to_contain_text("parameters", timeout=60_000)
            fill_settings(page, {**BROWSER_SETTINGS, "n_embd": "31"})
            page.locator("#set-n_embd").dispatch_event("change")
            expect(page.locator("#err-n_embd")).to_contain_text("must be divisible by n_head")
            fill_settings(page, BROWSER_SETTINGS)
            page.locator("#set-n_embd").dispatch_event("change")
            expect(page.locator("#estimate")).to_contain_text("3,000 steps", timeout=90_000)  # after the presets
            expect(page.locator("#err-n_embd")).to_be_hidden()
            page.fill("#run-name", "first")
            shot(page, "model")

            # 3. train: the chart gets points, a sample is pinned to each report; stop, resume
            page.click("#start")
            expect(page.locator("#run-title")).to_have_text("first")
            page.wait_for_function("Number(document.getElementById('step-slider').max) >= 2", timeout=60_000)
            page.click("#stop")
            expect(page.locator("#run-facts")).to_contain_text("stopped", timeout=60_000)
            stopped = s.get("/api/runs/first").json()
            assert stopped["state"] == "stopped" and stopped["step"] < 3000
            assert page.locator("#chart polyline").count() == 2  # train and val
            page.click("#resume")
            expect(page.locator("#run-facts")).to_contain_text("finished", timeout=180_000)
            expect(page.locator("#run-facts")).to_contain_text("step 3,000 of 3,000")
            expect(page.locator("#chart circle")).to_have_count(1)  # the best checkpoint, marked
            first = s.get("/api/runs/first").json()
            page.locator("#step-slider").fill("0")
            expect(page.locator("#step-shown")).to_have_text("0")
            assert page.inner_text("#sample") == first["metrics"][0]["sample"]  # what it wrote at step 0
            assert "step=0" in page.url
            page.locator("#step-slider").fill(str(len(first["metrics"]) - 1))
            expect(page.locator("#step-shown")).to_have_text("3000")
            shot(page, "train")
            page.fill("#extend-steps", "100")  # Extend: 100 more steps, the time as before
            page.click("#extend")
            expect(page.locator("#run-facts")).to_contain_text("step 3,100 of 3,100", timeout=120_000)
            expect(page.locator("#run-facts")).to_contain_text("finished")

            # a second run with other settings, to compare
            page.click("nav.steps >> text=2 Model")
            fill_settings(page, {**BROWSER_SETTINGS, "max_iters": "300", "learning_rate": "0.005"})
            page.fill("#run-name", "second")
            page.click("#start")
            expect(page.locator("#run-title")).to_have_text("second")
            expect(page.locator("#run-facts")).to_contain_text("finished", timeout=120_000)

            # 4. compare: only what differs; then generate and look inside
            page.check("[aria-label='compare first']")
            page.check("[aria-label='compare second']")
            page.click("nav.steps >> text=4 Compare")
            expect(page.locator("#compare-chart polyline")).to_have_count(4)
            rows = page.locator("#differ tbody tr td:first-child").all_inner_texts()
            assert set(rows) == {"learning_rate", "max_iters"}, rows
            assert "runs=first%2Csecond" in page.url or "runs=first,second" in page.url
            page.click("#open-playground")
            frame = page.frame_locator("#playground")
            expect(frame.locator("#card-run")).to_contain_text("second (best", timeout=30_000)
            frame.locator("#prompt").fill("All:")
            frame.locator("#max_tokens").fill("40")
            frame.locator("#temperature").fill("0")
            frame.locator("#generate").click()
            expect(frame.locator("#status")).to_contain_text("characters in", timeout=30_000)
            assert frame.locator("#output .tok").count() == 40
            frame.locator("#inspect").click()
            expect(frame.locator("#inspect-status")).to_contain_text("attends to", timeout=30_000)
            assert (frame.locator("#layer option").count(), frame.locator("#head option").count()) == (1, 2)
            shot(page, "compare")
            assert page.evaluate("document.documentElement.scrollWidth") <= width + 1  # nothing overflows

            # the state is in the URL: a new tab on the same link opens the same view
            again = browser.new_page(viewport={"width": width, "height": height})
            again.on("pageerror", lambda e: errors.append(str(e)))
            again.context.add_cookies([{"name": "tinygpt_studio", "value": TOKEN, "url": s.url}])
            again.goto(page.url)
            expect(again.locator("#compare-chart polyline")).to_have_count(4)
            expect(again.locator("#inspect-title")).to_have_text("second")
        finally:
            browser.close()
    # The browser logs each 4xx answer as a console error: the 400s are the bad n_embd this test typed
    # (and the settings between its keystrokes), answered as designed. Nothing else may appear.
    provoked = "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    assert [e for e in errors if e != provoked] == [], errors
