"""benchmarks/: the scripts' counts of rounds, images and scenes refuse what they cannot run, with argparse's line."""
import argparse
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import positive_int  # noqa: E402


def test_counts_are_integers_of_at_least_one():
    assert positive_int("3") == 3
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            positive_int(bad)
    done = subprocess.run([sys.executable, "benchmarks/startup.py", "--repeats", "0", "--no-write"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("startup.py: error: argument --repeats: expected an integer >= 1, "
                                                    "got 0")
