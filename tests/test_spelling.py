"""The project spells "normalize" one way (its style rule, never the British spelling): code, tests, docs and
notebooks are searched for the other."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEARCHED = ["tclip_jax", "tests", "training", "benchmarks", "colab", "docs", "README.md"]
TEXT = {".py", ".md", ".ipynb", ".txt", ".json", ".cfg", ".toml", ".html", ".js", ".css"}
OTHER_SPELLING = re.compile("normal" + "is", re.IGNORECASE)  # split, or this file would hold it


def test_normalize_is_spelt_one_way():
    paths = [ROOT / name for name in SEARCHED if (ROOT / name).is_file()]
    paths += [p for name in SEARCHED for p in (ROOT / name).rglob("*") if p.is_file() and p.suffix in TEXT]
    found = [f"{p.relative_to(ROOT)}:{i}" for p in paths
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OTHER_SPELLING.search(line)]
    assert found == []
