"""Tensors of a TorchScript archive (OpenAI's released `.pt` files) read without running any of its code.

`torch.jit.load` compiles the archive's `code/` and runs each object's TorchScript `__setstate__`, which can open
and write files (`torch.from_file(..., shared=True)`): loading a downloaded archive with it runs the archive's author's
code. Here nothing is compiled or run:

- `data.pkl` is unpickled by an unpickler that knows only tensors (`torch._utils._rebuild_tensor_v2`, storages,
  `OrderedDict`, TorchScript's list builders) and stands an inert `ScriptObject` in for every `__torch__` class:
  an object's pickled state is kept as data, its `__setstate__` never called. Any other global is refused.
- Which attributes are parameters and buffers is read from the class definitions in `code/` (`__parameters__`,
  `__buffers__`) with `ast.parse` and `ast.literal_eval`, which parse text and evaluate literals only.

The result is `torch.jit.load(path).state_dict()`'s names and values: each module's parameters and buffers, keyed by
their dotted path from the root module, and the class of every module (which says, for one, its MLP activation;
an archive whose code computes GELU's tanh approximation is refused: its class is GELU's all the same).
Storages are read little-endian (the archives' `byteorder`); bfloat16 tensors become float32 exactly and are reported
as stored.
"""
from __future__ import annotations

import ast
import collections
import math
import pickle
import re
import zipfile
from typing import Any

import numpy as np

from tclip_jax.checkpoints.convert import ConversionError

_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
                   "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
                   "ByteStorage": "u1", "BoolStorage": "?"}
# A tensor may view its storage with a stride of 0 (an expanded buffer); copied, it could be made to fill any memory.
_MAX_EXPANDED = 1 << 20
# The records read beside the storages (data.pkl, byteorder, the class definitions in code/) are kilobytes in a real
# archive; each is read or unpickled whole, and a deflated one could unpack to any size first.
_MAX_RECORD_BYTES = 64 << 20
# TorchScript's pickler writes typed lists through these; each is the list itself.
_LIST_BUILDERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_empty_list")


def is_torchscript(path) -> bool:
    """Whether `path` is a TorchScript archive (torch's own test: a zip with a `constants.pkl` record)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


class ScriptObject:
    """An instance of a TorchScript class as the archive stored it: `state` is its pickled state, kept as data."""

    qualified_name = "?"

    def __setstate__(self, state: Any) -> None:  # called by pickle's BUILD; runs none of the class's code
        self.state = state


def read_torchscript(path) -> tuple[dict[str, tuple[np.ndarray, str]], frozenset[str]]:
    """({dotted name: (array, the dtype it is stored as)} of an archive's parameters and buffers (bfloat16 tensors
    as float32), the qualified class names of its modules, mangling left out:
    `__torch__.torch.nn.modules.activation.GELU` for torch's GELU wherever TorchScript numbered a copy of it
    (`...activation.___torch_mangle_4.GELU`))."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ConversionError(f"{path} is not a TorchScript archive with one data.pkl")
        prefix = pickles[0].rsplit("/", 1)[0]
        byteorder = f"{prefix}/byteorder"
        order = archive.read(_small_record(archive, byteorder)).strip() if byteorder in names else b""
        if order not in (b"", b"little"):
            raise ConversionError(f"{path} stores its tensors in {order.decode(errors='replace')!r} byte order; only "
                                  "little-endian archives are read")
        tensor_names = _tensor_attributes(archive, prefix)
        root = _Unpickler(archive, prefix).load()
    if not isinstance(root, ScriptObject):
        raise ConversionError(f"{path} holds a {type(root).__name__}, not a TorchScript module")
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    classes: set[str] = set()
    _collect(root, "", tensor_names, arrays, classes)
    return arrays, frozenset(re.sub(r"\.___torch_mangle_\d+", "", name) for name in classes)


def _small_record(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """Record `name` of the archive, to read: refused before it is read if it unpacks to more than
    `_MAX_RECORD_BYTES`."""
    info = archive.getinfo(name)
    if info.file_size > _MAX_RECORD_BYTES:
        raise ConversionError(f"{archive.filename}: {name} unpacks to {info.file_size} bytes, far more than such a "
                              "record of a model holds; it is not read")
    return info


def _tensor_attributes(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """{qualified class name: its parameter and buffer names}, from the class definitions' source text."""
    classes: dict[str, set[str]] = {}
    code = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        source = archive.read(_small_record(archive, name))
        try:
            tree = ast.parse(source.decode("utf-8"))
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    classes[f"{module}.{node.name}"] = _declared_tensors(node)
        except (SyntaxError, UnicodeDecodeError, ValueError, TypeError, MemoryError, RecursionError) as err:
            raise ConversionError(f"cannot read the class definitions in {name} of the archive "
                                  f"({type(err).__name__}: {err})") from None
        approximation = _gelu_approximation(tree)
        if approximation is not None:  # its class is torch's GELU whatever the approximation: told by the code alone
            raise ConversionError(f"{archive.filename}: {name} computes GELU with approximate={approximation!r}, which "
                                  "no CLIP here computes (exact GELU or QuickGELU)")
    return classes


def _gelu_approximation(tree: ast.Module) -> str | None:
    """The `approximate` argument other than "none" (e.g. "tanh") of a `torch.gelu` call in a class definition's
    code, or None: torch's GELU module computes `torch.gelu(input, approximate=...)`, its own setting written in as a
    constant."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "gelu"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            for keyword in node.keywords:
                value = keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
                if keyword.arg == "approximate" and value != "none":
                    return value if isinstance(value, str) else ast.unparse(value)
    return None


def _declared_tensors(node: ast.ClassDef) -> set[str]:
    """The names a class's `__parameters__ = [...]` and `__buffers__ = [...]` list (literals only)."""
    tensors = set()
    for statement in node.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(
                statement.targets[0], ast.Name) and statement.targets[0].id in ("__parameters__", "__buffers__"):
            names = ast.literal_eval(statement.value)
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{node.name}.{statement.targets[0].id} is not a list of names")
            tensors.update(names)
    return tensors


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(_small_record(archive, f"{prefix}/data.pkl")))
        self._archive, self._prefix = archive, prefix
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return lambda *items: list(items[0]) if items else []
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, type_name: value
        raise ConversionError(f"{self._archive.filename} asks to run {module}.{name} as it is read, which tclip "
                              "never does (an archive of a model holds tensors and modules only)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and pid[1] in _STORAGE_DTYPES.values() and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, count = pid
        entry = self._archive.getinfo(f"{self._prefix}/data/{key}")
        needed = count * np.dtype(dtype).itemsize
        if entry.file_size > needed:  # before reading: a compressed entry can unpack to any size (a zip bomb)
            raise ConversionError(f"{self._archive.filename}: storage {key} unpacks to {entry.file_size} bytes, more "
                                  f"than the {needed} bytes of its {count} values; it is not read")
        raw = self._archive.read(entry)
        values = np.frombuffer(raw, np.dtype(dtype))
        if values.size < count:
            raise pickle.UnpicklingError(f"storage {key} holds {values.size} values, the pickle says {count}")
        return values, dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    values, dtype = storage
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if offset < 0 or last >= values.size or any(s < 0 for s in stride) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor of shape {size} reaches past its storage of {values.size} values")
    count = math.prod(size)
    if count > max(values.size, _MAX_EXPANDED):  # torch would make a view; a copy this size is an attack
        raise pickle.UnpicklingError(f"a tensor of shape {size} repeats its storage of {values.size} values "
                                     f"{count // max(values.size, 1)} times over; no checkpoint holds such a tensor")
    array = np.lib.stride_tricks.as_strided(values[offset:], size, tuple(s * values.itemsize for s in stride)).copy()
    if dtype == "<u2":  # bfloat16: the upper half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32), "bfloat16"
    return array, str(array.dtype)


def _collect(obj: ScriptObject, prefix: str, tensor_names: dict[str, set[str]], arrays: dict, classes: set) -> None:
    state = obj.state if isinstance(getattr(obj, "state", None), dict) else {}
    if obj.qualified_name not in tensor_names:  # torch.jit.load refuses such an archive too
        raise ConversionError(f"the archive has no class definition of {obj.qualified_name} (code/ is incomplete)")
    classes.add(obj.qualified_name)
    tensors = tensor_names[obj.qualified_name]
    for name, value in state.items():
        if isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{name}.", tensor_names, arrays, classes)
        elif name in tensors and isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray):
            arrays[f"{prefix}{name}"] = value
