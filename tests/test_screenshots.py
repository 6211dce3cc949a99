"""docs/screenshots.py remakes the README's explorer screenshots in a real headless browser (`tests/browser.py`)."""
import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

import browser

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "screenshots.py"


def test_screenshots_are_the_explorer_at_the_readmes_sizes(tmp_path):
    reason = browser.missing()
    assert reason is None, reason
    spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    assert screenshots.main(["--out", str(tmp_path)]) == 0
    for name, size, *_ in screenshots.SHOTS:
        shot = Image.open(tmp_path / name)
        assert shot.mode == "P" and shot.size == size  # 256 colours, the window's inner size
        assert shot.size == Image.open(SCRIPT.parent / name).size  # what the README shows
        assert len(np.unique(np.asarray(shot))) > 64  # a rendered page with maps, not a blank window


def test_help_says_what_the_script_does_and_writes_nothing():
    """`docs/screenshots.py --help` ran the whole job and replaced the README's screenshots."""
    committed = {name: (SCRIPT.parent / name).read_bytes() for name in ("explorer.png", "explorer_compare.png")}
    run = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("usage: ") and "--out DIR" in run.stdout
    assert {name: (SCRIPT.parent / name).read_bytes() for name in committed} == committed
