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


@pytest.mark.parametrize("command, message", [
    (["benchmarks/host_step.py", "--timing-images", "0"], "argument --timing-images: expected an integer >= 1, got 0"),
    (["benchmarks/host_step.py", "--fidelity-maps", "3", "0", "3"], "argument --fidelity-maps: expected an integer"),
    (["benchmarks/sweep_throughput.py", "--model", "{tmp}", "--scenes", "1"],
     "the run on 1 device(s) failed: FileNotFoundError: {tmp} is not a CLIP checkpoint folder"),
])
def test_bad_arguments_end_a_benchmark_with_one_line(tmp_path, command, message):
    done = subprocess.run([sys.executable, *(c.format(tmp=tmp_path) for c in command), "--no-write"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message.format(tmp=tmp_path) in done.stderr.strip().splitlines()[-1]


def test_a_section_is_replaced_whole_and_the_text_around_it_kept(tmp_path):
    from benchmarks._common import write_section

    results = tmp_path / "RESULTS.md"
    write_section("one", "first table", results)
    results.write_text(results.read_text() + "\nReading by hand, after the end marker.\n")
    write_section("two", "another", results)
    write_section("one", "new table", results)
    text = results.read_text()
    assert text.index("<!-- one:start -->\nnew table\n<!-- one:end -->") < text.index("Reading by hand") \
        < text.index("<!-- two:start -->\nanother\n<!-- two:end -->")
    assert "first table" not in text and sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]
    with pytest.raises(ValueError, match="section name must be"):
        write_section("bad name", "x", results)


def test_a_synthetic_run_of_some_methods_or_protocols_is_not_written_over_a_whole_table():
    for part in (["--methods", "tclip_k1"], ["--protocols", "captions"]):
        done = subprocess.run([sys.executable, "benchmarks/synthetic_grounding.py", "--scenes", "1", *part], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].endswith("--methods or --protocols measure part of a model's "
                                                             "table, which would replace the whole one in RESULTS.md: "
                                                             "add --no-write")
