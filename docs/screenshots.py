"""Remakes the README's explorer screenshots (docs/explorer.png, docs/explorer_compare.png) from the demo's scene and
the embedded default model: `tclip explain` of the scene's caption as `make demo` runs it (explorer.png) and with
`--compare similarity` (explorer_compare.png), opened in headless Chromium (Debian's chromium and chromium-driver,
driven by selenium, as the browser tests are), saved as 256-colour PNGs.

Run it after the embedded model or the explorer changes (`--out DIR` writes them elsewhere):

    .venv/bin/python docs/screenshots.py [--out DIR]
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
from typing import Optional, Sequence

DOCS = pathlib.Path(__file__).resolve().parent
# (file, window width x height, the run's compare flags, view, the caption word shown): one word of the demo's page in
# the single view, another compared with a baseline too.
SHOTS = (("explorer.png", (1000, 740), (), "single", "circle"),
         ("explorer_compare.png", (1000, 600), ("--compare", "similarity"), "compare", "square"))
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--force-device-scale-factor=1")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DOCS, metavar="DIR",
                        help="folder the screenshots are written to (default: docs/, replacing the README's)")
    out = parser.parse_args(argv).out  # --help ends here, before the imports and the runs
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from tclip_jax import demo, synthetic
    from tclip_jax.cli import main as tclip
    from tclip_jax.files import write_image

    out.mkdir(parents=True, exist_ok=True)
    scene = synthetic.protocol_sample(demo.DEMO_PROTOCOL, demo.DEMO_SEED).scene
    work = pathlib.Path(tempfile.mkdtemp(prefix="tclip-screenshots-"))
    try:
        image = work / "scene.png"
        write_image(image, scene.image)
        for name, _, compare, _, _ in SHOTS:  # a run per shot, into a folder named after it
            run = ["--prompt", scene.caption, *compare, "--out", str(work / pathlib.Path(name).stem)]
            if tclip(["explain", str(image), *run]) != 0:
                return 1
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in (*FLAGS, f"--user-data-dir={work / 'profile'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                                  options=options)
        try:
            for name, (width, height), _, view, word in SHOTS:
                driver.set_window_rect(width=width, height=height)
                # The window's inner size is the screenshot's: grow the window by its frame.
                inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
                driver.set_window_rect(width=2 * width - inner[0], height=2 * height - inner[1])
                driver.get((work / pathlib.Path(name).stem / "index.html").as_uri())
                if view == "compare":
                    driver.find_element("css selector", 'input[data-control="view"][value="compare"]').click()
                key = next(b.get_attribute("data-key") for b in driver.find_elements("css selector", ".tclip-word")
                           if b.text == word)  # the first button of the word
                driver.find_element("css selector", f'.tclip-word[data-key="{key}"]').click()
                expected = f"0:{key}:heatmap:shared:{view}"
                WebDriverWait(driver, 30).until(lambda d: d.find_element("css selector", ".tclip-x").get_attribute(
                    "data-rendered") == expected)
                png = work / name
                driver.save_screenshot(str(png))
                Image.open(png).convert("RGB").quantize(256).save(out / name, optimize=True)
                print(f"{out / name}: the word {word!r} of {scene.caption!r} ({view} view)")
        finally:
            driver.quit()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
