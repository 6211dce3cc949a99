"""The project spells "normalize" one way (its style rule, never the British spelling): code, tests, docs and
notebooks are searched for the other. And the README's Layout names every module of the package."""
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


def test_the_readmes_layout_names_every_top_level_module():
    """synthetic.py, notebook.py and demo.py were missing from the Layout section."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("- **Layout**"):readme.index("- **One interface for every method**")]
    modules = [p.name for p in (ROOT / "tclip_jax").glob("*.py") if not p.name.startswith("_")]
    assert modules and [m for m in modules if f"`tclip_jax/{m}`" not in layout] == []
