"""The converted-checkpoint folder: `params.safetensors` or `params.npz` + `tclip_config.json`
(+ `tokenizer/` files).

Parameters are stored flat under '/'-joined Flax paths, never pickled; float16 storage is allowed
(cast to float32 on load). `params.npz` is zip-compressed, which suits checkpoints with many zero
rows (e.g. an unused vocabulary) such as the embedded default model. Folders are written through
`staged_folder`, so an interrupted save never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import warnings
from typing import Any, Mapping, Optional

import flax.traverse_util
import numpy as np
import safetensors.numpy

from tclip_jax.files import loads_json, staged_folder, write_safetensors
from tclip_jax.model import CLIPConfig, param_shapes
from tclip_jax.model.tokenizer import TOKENIZER_FILES

PARAMS_FILES = ("params.safetensors", "params.npz")
CONFIG_FILE = "tclip_config.json"
TOKENIZER_DIR = "tokenizer"
# Every file `save_checkpoint` may write, as paths in the folder: what replacing a converted folder may delete.
WRITTEN_FILES = (*PARAMS_FILES, CONFIG_FILE, *(f"{TOKENIZER_DIR}/{name}" for name in TOKENIZER_FILES))
FORMAT_NAME = "tclip_jax"
HEADER_FIELDS = ("format", "version", "config")  # what save_checkpoint writes itself; the rest is its metadata


class CheckpointError(ValueError):
    """A checkpoint or parameter tree does not fit its config."""


def flatten(params: Mapping) -> dict[str, np.ndarray]:
    return {"/".join(path): np.asarray(leaf) for path, leaf in flax.traverse_util.flatten_dict(params).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def not_floating(name: str, array: np.ndarray) -> Optional[str]:
    """The problem of a weight stored as integers or booleans (cast to float32 it would load as other weights), or
    None."""
    dtype = np.dtype(array.dtype) if hasattr(array, "dtype") else np.asarray(array).dtype  # a jax array stays put
    return f"{name}: stored as {dtype}, a CLIP's weights are floating point" if dtype.kind in "biu" else None


def param_problems(flat: Mapping[str, np.ndarray], config: CLIPConfig,
                   origins: Optional[Mapping[str, str]] = None) -> list[str]:
    """Every way `flat` differs from the parameters `CLIP(config)` expects (empty when it fits).

    `origins` maps parameter paths to the checkpoint keys they came from, to name those too.
    """
    origins = origins or {}
    named = lambda key: f"{key} (from {origins[key]})" if key in origins else key
    expected = {"/".join(path): leaf for path, leaf in
                flax.traverse_util.flatten_dict(param_shapes(config)).items()}
    problems = [f"missing parameter: {k} {expected[k].shape}" for k in sorted(set(expected) - set(flat))]
    problems += [f"unexpected parameter: {k}" for k in sorted(set(flat) - set(expected))]
    for key in sorted(set(flat) & set(expected)):
        value = flat[key]
        if value.shape != expected[key].shape:
            problems.append(f"shape mismatch: {named(key)} is {value.shape}, model expects {expected[key].shape}")
        elif (problem := not_floating(named(key), value)) is not None:
            problems.append(problem)
        elif not np.isfinite(value).all():
            problems.append(f"non-finite values (NaN or inf) in {named(key)}")
    return problems


def check_params(flat: Mapping[str, np.ndarray], config: CLIPConfig, what: str) -> dict:
    """Raises CheckpointError with the full diff, else returns the nested float32 tree."""
    problems = param_problems(flat, config)
    if problems:
        raise CheckpointError(f"{what} does not fit the CLIP config ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def save_checkpoint(folder: str | os.PathLike, params: Mapping, config: CLIPConfig, *,
                    metadata: Optional[Mapping[str, Any]] = None, tokenizer_dir: Optional[os.PathLike] = None,
                    storage_dtype: np.dtype = np.float32, compressed: bool = False,
                    overwrite: bool = False) -> pathlib.Path:
    """Writes a converted checkpoint folder atomically and returns its path."""
    folder = pathlib.Path(folder)
    flat = flatten(params)
    check_params(flat, config, "parameters to save")
    with np.errstate(over="ignore"):  # found below, by name
        stored = {k: np.array(v, dtype=storage_dtype, order="C") for k, v in flat.items()}  # 0-d stays 0-d
    overflowed = [k for k, v in stored.items() if not np.isfinite(v).all()]  # the inputs are finite (checked)
    if overflowed:
        raise CheckpointError(f"{', '.join(overflowed[:3])}{' ...' if len(overflowed) > 3 else ''}: values beyond "
                              f"{np.dtype(storage_dtype).name}'s range (±{np.finfo(storage_dtype).max:g}); "
                              "store them as float32")
    with staged_folder(folder, overwrite) as staging:
        if compressed:
            np.savez_compressed(staging / PARAMS_FILES[1], **stored)
        else:
            write_safetensors(staging / PARAMS_FILES[0], stored)
        header = {"format": FORMAT_NAME, "version": 1, "config": config.to_dict(), **(metadata or {})}
        (staging / CONFIG_FILE).write_text(json.dumps(header, indent=2) + "\n")
        if tokenizer_dir is not None:  # its files only: a hub folder holds its weights beside them
            (staging / TOKENIZER_DIR).mkdir()
            for source in (pathlib.Path(tokenizer_dir) / name for name in TOKENIZER_FILES):
                if source.is_file():
                    shutil.copyfile(source, staging / TOKENIZER_DIR / source.name)
    return folder


def is_checkpoint(folder: str | os.PathLike) -> bool:
    return (pathlib.Path(folder) / CONFIG_FILE).is_file()


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict, CLIPConfig, dict]:
    """Returns (params, config, header) of a converted checkpoint folder."""
    folder = pathlib.Path(folder)
    header_path = folder / CONFIG_FILE
    if not header_path.is_file():
        raise FileNotFoundError(f"{folder} is not a tclip_jax checkpoint: no {CONFIG_FILE}")
    try:
        header = loads_json(header_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{header_path} is not valid JSON: {err}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{header_path} is not a {FORMAT_NAME} checkpoint header (no \"format\": "
                              f"\"{FORMAT_NAME}\")")
    if "config" not in header:
        raise CheckpointError(f"{header_path} has no \"config\" (the model's architecture)")
    try:
        config = CLIPConfig.from_dict(header["config"])
    except ValueError as err:
        raise CheckpointError(f"{header_path}: config: {err}") from None
    params_file = next((folder / name for name in PARAMS_FILES if (folder / name).is_file()), None)
    if params_file is None:
        raise FileNotFoundError(f"{folder} has none of {PARAMS_FILES} (as regular files)")
    params_file.open("rb").close()  # one this process may not read is said so (safetensors says "No such file")
    try:
        if params_file.suffix == ".npz":
            with np.load(params_file, allow_pickle=False) as archive:
                flat = {k: archive[k] for k in archive.files}
        else:
            flat = safetensors.numpy.load_file(params_file)
    except Exception as err:  # zipfile / safetensors raise their own types for truncated or corrupt files
        raise CheckpointError(f"{params_file} is unreadable (truncated or corrupt?): {err}") from None
    warn_if_upcast({str(v.dtype) for v in flat.values()}, str(params_file))
    return check_params(flat, config, f"checkpoint {folder}"), config, header


def metadata_of(header: Mapping[str, Any]) -> dict:
    """The metadata a checkpoint was saved with: where its weights came from (`tclip convert` records their source
    and origin), how they were trained."""
    return {key: value for key, value in header.items() if key not in HEADER_FIELDS}


def warn_if_upcast(dtypes: set[str], what: str) -> None:
    """Says when parameters were stored as bfloat16: they are upcast to float32 (exactly), the parameter dtype of
    every computation here; `load_clip(..., dtype=jnp.bfloat16)` runs the matmuls in bfloat16."""
    if "bfloat16" in dtypes:
        warnings.warn(f"{what} stores bfloat16 parameters; they are upcast to float32 (pass dtype=bfloat16 to "
                      "load_clip for bfloat16 matmuls)", stacklevel=3)
