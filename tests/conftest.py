"""Shared test fixtures: the reference outputs live in ../shared/fixtures beside the checkout."""
import atexit
import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# One XLA compilation cache for the session and the processes its tests start (set before jax is imported): many
# tests compile the same program again (a run and its resumed copy, a sweep in a fresh process), and compiling
# dominates their time. A fresh folder each session, so nothing carries over between runs of the suite.
_XLA_CACHE = tempfile.mkdtemp(prefix="tclip-tests-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# A size limit (far above what the suite writes) turns on JAX's file lock around every cache read and write. Without
# it an entry is written in place, unlocked, and a concurrent process can read it half-written: JAX then warns on
# stderr, which tests of the CLI's exact output would see.
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2**40)
# XLA's CPU programs compiled without LLVM's optimisation passes, for this session and the processes it starts: the
# suite's programs are small and run a few times each, so compiling is most of its cost, and this halves it (a tiny
# training step 5.4 -> 2.7 s). The programs compute the same operations in the same order; results can differ in the
# last bits from the default compile's (maps by 1e-6 of their range), as between two CPUs. Properties the product
# claims bit for bit (a sweep at any batch size, a resumed run) compare runs of one compile and hold under either. A
# flag this XLA does not know would abort every process, so it is first tried in a throwaway one.
def _quick_compile_flag() -> list[str]:
    flag = "--xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), flag])}
    probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; (jnp.ones(2) + 1).block_until_ready()"],
                           env=env, capture_output=True, timeout=300)
    return [flag] if probe.returncode == 0 else []


# The flags as they were (XLA's default optimisation): for a process a test starts whose work is mostly running a
# few programs on much data, where optimised programs save more than their compiling costs (the held-out gates of
# test_default_model: 63 -> 45 CPU-s).
XLA_FLAGS_OPTIMISED = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [XLA_FLAGS_OPTIMISED, *_quick_compile_flag()]))

import jax  # noqa: E402
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {FIXTURES}; CI keeps ../shared beside the checkout")
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_npz(fixtures_dir):
    """`load(relative_path)`: the arrays of one .npz file under the fixtures folder, as a dict (read once)."""
    @functools.cache
    def load(relative_path: str) -> dict[str, np.ndarray]:
        with np.load(fixtures_dir / relative_path) as f:
            return {k: f[k] for k in f.files}

    return load


@pytest.fixture(scope="session")
def fixture_images(fixture_npz):
    return fixture_npz("images.npz")


@pytest.fixture
def highest_precision():
    """Float32 matmuls as float32 (parity tests against float32 references)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def compiled_programs():
    """The names of the XLA programs compiled (or read from the compilation cache) while the test runs, in order:
    JAX's backend-compile event, which it records once per program it compiles."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield names
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def tiny_model(fixture_npz):
    """(model, float32 params) of the fixtures' tiny OpenAI-format CLIP, converted by our rule table."""
    from tclip_jax.model import CLIP
    from tclip_jax.checkpoints.convert import convert_state_dict, infer_openai_config

    state_dict = {k: v.astype(np.float32) for k, v in fixture_npz("tiny_openai_clip.npz").items()}
    config = infer_openai_config(state_dict)
    return CLIP(config), convert_state_dict(state_dict, config)


def png_broken_past_its_header(png: bytes) -> bytes:
    """PNG data with its first IDAT chunk's length halved: the header reads whole, but decoding reads a chunk name
    inside the compressed pixels, and PIL raises SyntaxError("broken PNG file"), which is no OSError (checked)."""
    import io
    import struct

    from PIL import Image

    data = bytearray(png)
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at:at + 4])
    data[at:at + 4] = struct.pack(">I", length // 2)
    with pytest.raises(SyntaxError, match="broken PNG file"), Image.open(io.BytesIO(bytes(data))) as image:
        image.load()
    return bytes(data)


# A 64x48 picture in PostScript (EPS) that PIL would render by running Ghostscript.
EPS_BYTES = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nnewpath 0 0 moveto 64 48 lineto stroke\nshowpage\n"


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch) -> pathlib.Path:
    """A program `gs` first on PATH that writes the file it returns (the marker) whenever it runs; PIL's cached
    lookup of Ghostscript is reset, so that PIL finds it. A test asserts the marker never appears."""
    folder, marker = tmp_path / "fake_bin", tmp_path / "gs_ran"
    folder.mkdir()
    (folder / "gs").write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\n'
                               'if [ "$1" = --version ]; then echo 10.02.1; exit 0; fi\nexit 1\n')
    (folder / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


@pytest.fixture
def run_interrupted_while_importing(monkeypatch):
    """A function that runs `python -m MODULE` in this process (runpy), or for "module:function" what the script pip
    writes for that console-script target does (imports the module, calls the function), with a Ctrl-C raised as
    the command line's modules (`tclip_jax.cli`) are imported, and returns its exit status; the test fails where the
    KeyboardInterrupt escapes, as a traceback would."""
    import importlib
    import runpy

    class Interrupting:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "tclip_jax.cli":
                raise KeyboardInterrupt

    def run(target: str):
        module, _, function = target.partition(":")
        for name in ("tclip_jax.cli", module, f"{module}.__main__"):  # imported again (runpy runs them afresh)
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
        try:
            if function:
                return getattr(importlib.import_module(module), function)()
            runpy.run_module(module, run_name="__main__")
        except KeyboardInterrupt:  # (left to escape, it would end the test session)
            pytest.fail("the Ctrl-C escaped, as a traceback")
        except SystemExit as ended:
            return ended.code
        pytest.fail("it did not exit")

    return run
