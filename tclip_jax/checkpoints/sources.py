"""Reading PyTorch CLIP checkpoints from disk or the Hugging Face hub into numpy state dicts.

torch is needed only for `.pt` / `.bin` / `.pth` files (the `convert` extra); `.safetensors` and
`.npz` are read without it.
"""
from __future__ import annotations

import json
import os
import pathlib
import zipfile
from typing import Any, Mapping, Optional

import numpy as np

from tclip_jax.checkpoints.convert import ConversionError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")


def _require_file(path: pathlib.Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ConversionError(f"checkpoint file is empty: {path}")


def _from_torch(path: pathlib.Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path.name} needs PyTorch: pip install 'tclip_jax[convert]'") from None
    try:
        # OpenAI's released .pt files are TorchScript archives; everything else is a plain state dict.
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        pass
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt?): {err}") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:  # training checkpoints (OpenCLIP)
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return dict(loaded)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor; bfloat16 has no numpy twin
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors`, `.npz`, `.pt`, `.bin` or `.pth` state dict as float32 numpy arrays."""
    path = pathlib.Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            import safetensors.numpy
            raw = safetensors.numpy.load_file(path)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                raw = {k: archive[k] for k in archive.files}
        elif suffix in (".pt", ".bin", ".pth"):
            raw = _from_torch(path)
        else:
            raise ConversionError(f"unknown checkpoint file type {suffix!r}: {path} "
                                  "(expected .safetensors, .npz, .pt, .bin or .pth)")
    except (ConversionError, ImportError):
        raise
    except Exception as err:  # zipfile, numpy and safetensors each raise their own types on bad files
        raise ConversionError(f"cannot read {path} (truncated or corrupt?): {err}") from None
    # DataParallel / DDP checkpoints prefix every key with 'module.'.
    state = {k.removeprefix("module."): _to_numpy(v) for k, v in raw.items()}
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}


def hf_folder_files(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The weights file of a Hugging Face CLIPModel folder, or None if `folder` is not one."""
    if not (folder / "config.json").is_file():
        return None
    return next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)


def open_clip_folder_files(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The weights file of an OpenCLIP hub folder, or None if `folder` is not one."""
    return next((folder / f for f in OPEN_CLIP_WEIGHT_FILES if (folder / f).is_file()), None)


def read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def download_from_hub(repo_id: str) -> pathlib.Path:
    """Downloads (or finds in the local hub cache) the files of a hub repository; returns its folder."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise ImportError("loading hub names needs huggingface_hub: pip install huggingface_hub") from None
    patterns = ["*.json", "*.txt", *HF_WEIGHT_FILES, *OPEN_CLIP_WEIGHT_FILES]
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except HfHubHTTPError as err:
        raise ValueError(f"{repo_id!r} is not a downloadable hub repository: {err}") from None
    except Exception as err:  # offline, DNS failure, proxy: huggingface_hub raises many types
        try:
            return pathlib.Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            pass
        raise ConnectionError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub and it is not in the local cache "
            f"({type(err).__name__}). On a machine with internet run `huggingface-cli download {repo_id} "
            f"--local-dir DIR`, copy DIR here and pass DIR as the model.") from None
