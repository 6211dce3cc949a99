"""Reading PyTorch CLIP checkpoints from disk or the Hugging Face hub into numpy state dicts.

torch is needed only for pickled `.pt` / `.bin` / `.pth` state dicts (the `convert` extra), version 2.6 or later:
before it `torch.load(weights_only=True)` could still run code a file holds (CVE-2025-32434). `.safetensors`, `.npz`
and TorchScript archives (OpenAI's `.pt` releases) are read without it. A large Hugging Face checkpoint is sharded:
`model.safetensors.index.json` (or `pytorch_model.bin.index.json`) maps each tensor to one of the shard files
beside it, each read like a single file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import pickle
import re
import warnings
import zipfile
from typing import Any, Mapping, Optional

import numpy as np

from tclip_jax.checkpoints.convert import ConversionError
from tclip_jax.checkpoints.torchscript import is_torchscript, read_torchscript
from tclip_jax.files import loads_json, read_npz

# transformers' order of preference; an `.index.json` stands for the shards its weight_map names.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HF_SHARD_FILES = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")  # the names transformers gives shards
SHARD_INDEX_SUFFIX = ".index.json"
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
ALL_WEIGHT_FILES = (*HF_WEIGHT_FILES, *HF_SHARD_FILES, *OPEN_CLIP_WEIGHT_FILES)  # every layout loading reads
STATE_DICT_SUFFIXES = (".safetensors", ".npz", ".pt", ".bin", ".pth")  # the single files `read_state_dict` reads


@dataclasses.dataclass(frozen=True)
class StateDict:
    """A checkpoint file's tensors as float32 numpy arrays, and what the file said about itself."""

    arrays: dict[str, np.ndarray]
    stored_dtypes: frozenset[str]        # the floating dtypes as stored (e.g. float16, bfloat16)
    module_classes: frozenset[str] = frozenset()  # a TorchScript archive's (`read_torchscript`); none otherwise
    training_run: Optional[str] = None   # an OpenCLIP training checkpoint's run name ({"name", "epoch", "state_dict"})

    @property
    def torchscript(self) -> bool:
        """Whether the file is a TorchScript archive (OpenAI's releases): one always holds its root module's class."""
        return bool(self.module_classes)


def require_regular_file(path: pathlib.Path, what: str = "checkpoint") -> None:
    """A missing path, a folder, a FIFO or a device is refused before anything opens it (a FIFO would block)."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ConversionError(f"{what} {path} is not a regular file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{what} file is empty: {path}")


def _from_torch(path: pathlib.Path) -> tuple[Mapping[str, Any], Optional[frozenset[str]], Optional[str]]:
    """(tensors, a TorchScript archive's module classes (None for a pickle), the OpenCLIP training run's name if it
    is a training checkpoint)."""
    if is_torchscript(path):  # OpenAI's released .pt files: read without torch.jit.load, which runs their code
        tensors, classes = read_torchscript(path)
        return {k: _Stored(*v) for k, v in tensors.items()}, classes, None
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path.name} needs PyTorch: pip install 'tclip_jax[convert]'") from None
    if tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        raise ImportError(f"reading {path.name} needs PyTorch 2.6 or later, and torch {torch.__version__} is "
                          "installed, whose torch.load can run code a file holds even with weights_only=True "
                          "(CVE-2025-32434): install torch>=2.6 (pip install 'tclip_jax[convert]'), or convert the "
                          "checkpoint to safetensors elsewhere")
    try:
        with warnings.catch_warnings():  # torch's note on a legacy pickle's protocol: what comes of it is said below
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only reader's refusal, whose advice is to unpickle it anyway
        refused = re.search(r"GLOBAL (\S+)", str(err))
        with open(path, "rb") as file:
            start = file.read(32)
        if refused is None and start[:1] == b"\x80" and start[1:2] in (b"\x03", b"\x04", b"\x05"):
            # torch.save's legacy (pre-zip) format pickles its magic number first; another pickle is another program's
            if start.startswith(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=start[1])):
                raise ConversionError(f"{path} is a PyTorch pickle of protocol {start[1]} (torch.save's legacy "
                                      "format), which torch's weights-only reader does not read: save it again in "
                                      "torch.save's default format, or as safetensors") from None
            raise ConversionError(f"{path} is a Python pickle (protocol {start[1]}), not a PyTorch checkpoint, and "
                                  "tclip never unpickles one: save the weights as safetensors or .npz") from None
        if refused is None:  # no pickle of anything (an error page saved as .pt, random bytes): not a checkpoint
            raise ConversionError(f"{path} is not a PyTorch checkpoint, no pickle of tensors (truncated or corrupt, "
                                  "or another kind of file?)") from None
        raise ConversionError(f"{path} is not a weights-only PyTorch checkpoint (its pickle loads {refused.group(1)}, "
                              "which is neither a tensor nor a plain container), and tclip never unpickles anything "
                              "else") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt?): {err}") from None
    run = None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:  # training checkpoints (OpenCLIP's epoch_N.pt)
        run = str(loaded.get("name", "")) if "epoch" in loaded else None
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded, None, run


def _to_numpy(value: Any) -> tuple[np.ndarray, str]:
    """(float32 array for floating values, the stored dtype's name)."""
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy twin
        dtype = str(value.dtype).removeprefix("torch.")
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy(), dtype
    array = np.asarray(value)
    return array, str(array.dtype)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: pathlib.Path) -> dict[str, Any]:
    """A .safetensors file as numpy arrays; BF16 tensors become float32 (exactly) and are reported as bfloat16.

    The format is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}
    and the raw data; read here directly because safetensors' numpy reader has no bfloat16.
    """
    data = path.read_bytes()
    if len(data) < 8:
        raise ConversionError(f"{path} is too short to be a safetensors file")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise ConversionError(f"{path}: its safetensors header says {header_size} bytes, more than the file holds "
                              "(truncated, or not a safetensors file)")
    try:
        header = loads_json(data[8:8 + header_size])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} has no valid safetensors header: {err}") from None
    body, tensors = memoryview(data)[8 + header_size:], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype("<u2" if entry["dtype"] == "BF16" else _SAFETENSORS_DTYPES[entry["dtype"]])
            shape, (start, end) = list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"{path}: tensor {name!r} is malformed ({type(err).__name__}: {err})") from None
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (*shape, start, end)):
            raise ConversionError(f"{path}: tensor {name!r} has shape {shape} and data_offsets {[start, end]}; "
                                  "each must be a non-negative integer")
        if not start <= end <= len(body):
            raise ConversionError(f"{path}: tensor {name!r} has data_offsets {[start, end]}, outside the "
                                  f"{len(body)} bytes of data")
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ConversionError(f"{path}: tensor {name!r} has {end - start} bytes of data, but its shape {shape} "
                                  f"of {entry['dtype']} takes {math.prod(shape) * dtype.itemsize}")
        tensors.append((start, end, name, entry["dtype"], dtype.newbyteorder("<"), shape))
    # As the safetensors library requires: the tensors tile the data, so none reads another's bytes.
    position = 0
    for start, end, name, *_ in sorted(tensors):
        if start != position:
            raise ConversionError(f"{path}: tensor {name!r} starts at byte {start} of the data, not at {position} "
                                  "where the tensor before it ends (tensors overlap or leave a gap)")
        position = end
    if position != len(body):
        raise ConversionError(f"{path}: its tensors end at byte {position} of the {len(body)} bytes of data")
    arrays = {}
    for start, end, name, stored, dtype, shape in tensors:
        raw = np.frombuffer(body[start:end], dtype).reshape(shape)
        if stored == "BF16":  # the upper half of a float32
            arrays[name] = _Stored((raw.astype(np.uint32) << 16).view("<f4"), "bfloat16")
        else:
            arrays[name] = raw.copy()
    return arrays


@dataclasses.dataclass(frozen=True)
class _Stored:
    """A tensor already converted to float32, with the dtype it was stored as."""

    array: np.ndarray
    dtype: str


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """A `.safetensors`, `.npz`, `.pt`, `.bin` or `.pth` state dict, or the shards a Hugging Face `*.index.json`
    names, as float32 numpy arrays. Nothing in the file is run: pickles are read by `torch.load(weights_only=True)`,
    or for TorchScript archives by `tclip_jax.checkpoints.torchscript`, each of which builds tensors and plain
    containers only."""
    path = pathlib.Path(path)
    require_regular_file(path)
    return _read_shards(path) if path.name.endswith(SHARD_INDEX_SUFFIX) else _read_file(path)


def _read_shards(index: pathlib.Path) -> StateDict:
    """The shards a Hugging Face index names, as one state dict. Each shard must be a file in the index's folder
    and hold the tensors the index places in it, and no tensor may be in two shards."""
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise ConversionError(f"{index} has no weight_map (tensor name -> shard file name)")
    shards = list(dict.fromkeys(weight_map.values()))
    for name in shards:  # all of them before the first is read (shards are gigabytes)
        if name in ("", "..") or pathlib.PurePath(name).name != name:
            raise ConversionError(f"{index} names shard {name!r}, which is not a file name in its folder")
        if not (index.parent / name).exists():
            raise ConversionError(f"{index} names shard {name}, which is missing from {index.parent}")
        require_regular_file(index.parent / name)
    arrays, dtypes, shard_of = {}, set(), {}
    for name in shards:
        state = _read_file(index.parent / name)
        twice = next((key for key in state.arrays if key in shard_of), None)
        if twice is not None:
            raise ConversionError(f"{index}: tensor {twice} is in two shards, {shard_of[twice]} and {name}")
        arrays.update(state.arrays)
        dtypes |= state.stored_dtypes
        shard_of.update(dict.fromkeys(state.arrays, name))
    misplaced = next((key for key, name in weight_map.items() if shard_of.get(key.removeprefix("module.")) != name),
                     None)
    if misplaced is not None:
        raise ConversionError(f"{index} places tensor {misplaced} in shard {weight_map[misplaced]}, which does not "
                              "hold it")
    return StateDict(arrays, frozenset(dtypes))


def _read_file(path: pathlib.Path) -> StateDict:
    """`read_state_dict` of one file, already checked to be a regular file."""
    suffix = path.suffix.lower()
    classes, run = None, None
    try:
        if suffix == ".safetensors":
            raw = read_safetensors(path)
        elif suffix == ".npz":
            raw = _read_npz(path)
        elif suffix in (".pt", ".bin", ".pth"):
            raw, classes, run = _from_torch(path)
        else:
            raise ConversionError(f"unknown checkpoint file type {suffix!r}: {path} "
                                  f"(expected {', '.join(STATE_DICT_SUFFIXES)})")
    except (ConversionError, ImportError, OSError):  # OSError: not read at all (no permission), not damaged
        raise
    except Exception as err:  # zipfile, numpy and safetensors each raise their own types on bad files
        raise ConversionError(f"cannot read {path} (truncated or corrupt?): {err}") from None
    arrays, dtypes = {}, set()
    for key, value in raw.items():
        array, dtype = (value.array, value.dtype) if isinstance(value, _Stored) else _to_numpy(value)
        if array.dtype.kind == "V":  # what numpy reads back of an ml_dtypes array np.savez wrote
            raise ConversionError(f"{path}: tensor {key} holds raw {array.dtype.itemsize}-byte values without a numpy "
                                  "dtype (bfloat16 saved by np.savez loses its dtype); save it as float32 or float16, "
                                  "or as safetensors")
        if array.dtype.kind == "c":  # casting to float32 would drop the imaginary part
            raise ConversionError(f"{path}: tensor {key} holds complex values; a CLIP's weights are real")
        if np.issubdtype(array.dtype, np.floating):
            dtypes.add(dtype)
            array = array.astype(np.float32)
        name = key.removeprefix("module.")  # DataParallel / DDP checkpoints prefix every key
        if name in arrays:
            raise ConversionError(f"{path}: tensor {name} is there twice, as {name} and module.{name}; keep one")
        arrays[name] = array
    return StateDict(arrays, frozenset(dtypes), classes or frozenset(), run)


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive (`read_npz`: nothing unpickled)."""
    try:
        return read_npz(path)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def hf_folder_files(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The weights file (or shard index) of a Hugging Face CLIPModel folder, or None if `folder` is not one."""
    if not (folder / "config.json").is_file():
        return None
    return next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)


def open_clip_folder_files(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The weights file of an OpenCLIP hub folder, or None if `folder` is not one."""
    return next((folder / f for f in OPEN_CLIP_WEIGHT_FILES if (folder / f).is_file()), None)


def read_json(path: pathlib.Path) -> dict:
    try:
        return loads_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def hub_weight_patterns(files: set[str], open_clip_first: bool = False) -> list[str]:
    """What to fetch of the weights of a hub repository holding `files`: the one layout loading reads (the first
    of `HF_WEIGHT_FILES` in a Hugging Face folder, an index with its shards; or OpenCLIP's file, first when
    `open_clip_first`), not every layout the repository ships (LAION's hold several, each gigabytes)."""
    hf = [f for f in HF_WEIGHT_FILES if f in files] if "config.json" in files else []
    open_clip = [f for f in OPEN_CLIP_WEIGHT_FILES if f in files]
    chosen = open_clip + hf if open_clip_first else hf + open_clip
    if not chosen:  # nothing loading would read: let it say what is missing
        return list(ALL_WEIGHT_FILES)
    shards = dict(zip(("model.safetensors.index.json", "pytorch_model.bin.index.json"), HF_SHARD_FILES))
    return [chosen[0], *([shards[chosen[0]]] if chosen[0] in shards else [])]


def download_from_hub(repo_id: str, flag: str = "the model", open_clip_first: bool = False) -> pathlib.Path:
    """A hub repository's configs, tokenizer files and the weights loading reads (`hub_weight_patterns`): from the
    local hub cache when it holds weights, else downloaded; returns its folder. `flag`: how an offline user passes
    the folder instead (named in the error). Called for a name that is no local file or folder, which its errors
    say too (a mistyped relative path looks like a hub name)."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise ImportError("loading hub names needs huggingface_hub: pip install huggingface_hub") from None
    patterns = ["*.json", "*.txt", *ALL_WEIGHT_FILES]
    try:  # cached: no network (offline, the hub library retries for half a minute, logging each try)
        cached = pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns,
                                                                local_files_only=True))
        wanted = [open_clip_folder_files] if open_clip_first else [hf_folder_files, open_clip_folder_files]
        if any(files(cached) is not None for files in wanted):  # the layout loading will read is there
            return cached
    except Exception:  # not in the cache (huggingface_hub raises its own types)
        pass
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry lines: the failure is said below, in one line
    try:
        listed = set(huggingface_hub.list_repo_files(repo_id))
        patterns = ["*.json", "*.txt", *hub_weight_patterns(listed, open_clip_first)]
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except HfHubHTTPError as err:
        raise ValueError(f"there is no file or folder {repo_id} in {os.getcwd()}, and {repo_id!r} is not a "
                         f"downloadable hub repository: {err}") from None
    except Exception as err:  # offline, DNS failure, proxy: huggingface_hub raises many types
        # The safetensors weights loading reads (`hub_weight_patterns`), whichever layout the repository holds:
        # OpenCLIP's for an hf-hub: name; else a Hugging Face model's (or its shards), else OpenCLIP's.
        weights = ["open_clip_model.safetensors"] if open_clip_first else ["model*.safetensors",
                                                                            "open_clip_model.safetensors"]
        raise ConnectionError(
            f"there is no file or folder {repo_id} in {os.getcwd()}, and tclip cannot fetch {repo_id!r} from the "
            "Hugging Face hub and it is not in the local cache "
            f"({type(err).__name__}). On a machine with internet run `hf download {repo_id} --include '*.json' "
            f"'*.txt' {' '.join(repr(w) for w in weights)} --local-dir DIR` (the weights tclip reads, not every "
            f"copy the repository holds), copy DIR here and pass DIR as {flag}.") from None
    finally:
        hub_log.setLevel(level)
