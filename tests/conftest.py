"""Shared test fixtures: the reference outputs live in ../shared/fixtures beside the checkout."""
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {FIXTURES}; CI keeps ../shared beside the checkout")
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_images(fixtures_dir):
    with np.load(fixtures_dir / "images.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def tiny_model(fixtures_dir):
    """(config, float32 params) of the fixtures' tiny OpenAI-format CLIP, converted by our rule table."""
    from weights_conversion.convert import convert_state_dict, infer_openai_config

    with np.load(fixtures_dir / "tiny_openai_clip.npz") as f:
        state_dict = {k: f[k].astype(np.float32) for k in f.files}
    config = infer_openai_config(state_dict)
    return config, convert_state_dict(state_dict, config)
