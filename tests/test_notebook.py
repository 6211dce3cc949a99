"""The Colab notebook runs headless on CPU against the embedded model; its helpers behave."""
import pathlib

import nbclient
import nbformat
import numpy as np
import pytest

from tclip_jax import notebook

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "colab" / "tclip_demo.ipynb"


def test_notebook_executes_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits it: the embedded model is used
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    assert "cpu" in text and "default_model" in text and "pointing_game" in text
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", []))


def test_offline_means_embedded_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not notebook.online()


def test_fetch_image_from_path_and_default(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((5, 7), 200, np.uint8)).save(tmp_path / "gray.png")
    assert notebook.fetch_image(str(tmp_path / "gray.png")).shape == (5, 7, 3)
    assert notebook.fetch_image(None).shape == (224, 224, 3)
    with pytest.raises(FileNotFoundError):
        notebook.fetch_image(str(tmp_path / "missing.png"))
