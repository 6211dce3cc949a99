"""Settings objects that own their command-line flags and their serialization.

A settings class is a frozen dataclass deriving from `Options` whose fields are declared with `setting(...)`: a
default, a help text, and how a string becomes a value (`parse`; without one, as the field's annotation says: bool,
int, float, str, Optional[X], tuple[X, ...], tuple[X, X] (that many), else as its default's type; a field of any other
type, a bare `tuple`, a tuple of mixed types or a class of the user's, must give `parse`, or its class is refused
when first used). A plain field, `steps: int =
900`, is one without a flag. From that one declaration it registers its flags on an argparse parser
(`add_arguments`, where a command calls it: `tclip explain` and `tclip sweep` register TCLIP's settings as flags,
and every other method's settings are their `--option KEY=VALUE`), reads them back (`given_arguments`, only the
flags given; `from_arguments`, the settings they make, a refused value named by its flag; `parse_flags`, flags kept
as text read by another class), takes `KEY=VALUE` assignments (`parse_assignments`, for `--option`), and round-trips
through JSON (`to_dict` / `from_dict`), so `tclip explain`, `tclip sweep`, result records and the Python API all
speak the same names. Unknown names and unparsable values are errors that name the setting and list the valid ones.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, TypeVar

import numpy as np

T = TypeVar("T", bound="Options")


def setting(default: Any, help: str, *, parse: Optional[Callable[[str], Any]] = None,
            choices: Optional[Sequence[Any]] = None, flag: bool = True, shown_default: Optional[str] = None,
            metavar: Optional[str] = None) -> Any:
    """A settings field. `parse` turns a command-line string into the value (default: as the field's annotation says,
    `Optional[int]` as `parse_optional(int)`, `tuple[float, ...]` as `parse_tuple(float)`; see the module docstring);
    `choices` restricts it (a None default stays allowed); `flag=False` leaves it out of `add_arguments` (still
    settable by `--option`). A flag exists only where a command registers the class's flags: `tclip explain` and
    `tclip sweep` register TCLIP's settings' (and the host-step ones every method has, `cli.common`), so another
    method's setting, `flag=True` or not, is given as `--option KEY=VALUE`; `shown_default` describes the default
    in help texts where the value alone would not say enough; `metavar` names the flag's value in help texts where
    a long list of `choices` would (the help then lists them)."""
    metadata = {"help": help, "parse": parse, "choices": tuple(choices) if choices is not None else None,
                "flag": flag, "shown_default": shown_default, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """" (did you mean 'x'?)", x the one of `names` closest to the unknown `name` (difflib, case-blind), or ""."""
    by_folded = {known.casefold(): known for known in names}
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1)
    return f" (did you mean {by_folded[close[0]]!r}?)" if close else ""


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, with "none" (any case) meaning None."""
    return lambda text: None if text.strip().lower() == "none" else parse(text)


def parse_tuple(parse: Callable[[str], Any], length: Optional[int] = None) -> Callable[[str], tuple]:
    """Comma-separated values, each read by `parse`; "" (or blanks) is the empty tuple, and an empty item inside
    ("0.25,,0.5", a trailing comma) is refused, not skipped: the list meant is not known. `length`: exactly that many
    values (a fixed-length tuple[X, X]), else ValueError naming it."""
    def read(text: str) -> tuple:
        parts = text.split(",") if text.strip() else []
        if any(not part.strip() for part in parts):
            raise ValueError(f"empty item in {text!r}")
        values = tuple(parse(part) for part in parts)
        if length is not None and len(values) != length:
            raise ValueError(f"expected {length} comma-separated values, got {len(values)} in {text!r}")
        return values
    return read


parse_float_tuple = parse_tuple(float)


def finite(name: str, value: float) -> None:
    """Raises ValueError unless `value` is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def finite_float32(name: str, value: float) -> None:
    """`finite`, and also finite and not rounded to 0 as float32, the type a setting cast to float32 (an optimizer's
    learning rate) runs in: 1e300 passed as finite and ran as inf, 1e-50 ran as 0 (a training that changed nothing)."""
    finite(name, value)
    with np.errstate(over="ignore", under="ignore"):  # what is refused here, in one line
        held = np.float32(value)
    if not math.isfinite(held) or (held == 0) != (value == 0):
        raise ValueError(f"{name} must be a finite number that float32 holds (at most "
                         f"{float(np.finfo(np.float32).max):g} in magnitude, and 0 or at least "
                         f"{float(np.finfo(np.float32).smallest_subnormal):g}), got {value!r}")


def integer(name: str, value: Any, minimum: Optional[int] = None) -> None:
    """Raises ValueError unless `value` is an int, Python's or numpy's (a loop over `np.arange`), not a bool nor a
    float, of at least `minimum`."""
    if not _is_a(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of settings classes (see the module docstring). Subclasses validate the rest in `__post_init__`, calling
    this one first."""

    def __post_init__(self):
        """Every field declared with `choices` holds one of them, and every field annotated bool, int, float or str
        (or Optional of one) a value of that type: a setting made from Python (`from_dict`) is refused when made,
        as one parsed from the command line is, not at first use."""
        hints = _field_types(type(self))
        _readers(type(self))  # a field that no text could set is refused as its class is first used
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            # A field whose default is None (nothing chosen, e.g. a flag not given) may stay None.
            if choices is not None and value not in choices and not (value is None and f.default is None):
                raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")
            checked = _checked(f.name, value, hints.get(f.name))
            if checked is not value:  # a numpy scalar, kept as the Python number (JSON-ready)
                object.__setattr__(self, f.name, checked)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, as_text: bool = False) -> None:
        """Registers `--<name>` for every field declared with `flag=True`. Flags not given stay unset in the
        namespace, so `given_arguments` can tell a default from a choice. `as_text`: the flags keep their text as
        typed (a --x/--no-x pair its bool), for the settings class they are handed to to read (`parse_flags`):
        flags of one class given to another (the command line's TCLIP flags, to the chosen method's settings) mean
        what that class's fields say, not this one's."""
        readers = _readers(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta.get("flag", False):
                continue
            flag = "--" + f.name.replace("_", "-")
            shown = meta["help"] + f" (default: {meta['shown_default'] or _show(f.default)})"
            if isinstance(f.default, bool) and meta["parse"] is None:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                    default=argparse.SUPPRESS, help=shown)
                continue
            if as_text:  # shown as argparse shows choices, checked by `parse_flags`
                metavar = meta.get("metavar") or ("{" + ",".join(map(str, meta["choices"])) + "}" if meta["choices"]
                                                  else f.name.upper())
                parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=shown)
                continue
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                                metavar=meta.get("metavar") or (None if meta["choices"] else f.name.upper()),
                                type=_argparse_type(f, readers[f.name]),
                                help=shown, choices=meta["choices"])

    @classmethod
    def given_arguments(cls, namespace: argparse.Namespace) -> dict[str, Any]:
        """The values of this class's flags that were given on the command line."""
        return {name: getattr(namespace, name) for name in cls.field_names() if hasattr(namespace, name)}

    @classmethod
    def from_arguments(cls: type[T], namespace: argparse.Namespace, **more: Any) -> T:
        """The settings the command line makes: its flags given (`given_arguments`) and `more` (values it gives
        otherwise), the defaults else; a value refused is named by its flag where a flag gave it."""
        given = cls.given_arguments(namespace)
        with named_by_flags(given):
            return cls.from_dict({**given, **more})

    @classmethod
    def parse_flags(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Flags kept as text (`add_arguments(as_text=True)`, `given_arguments`), each read by this class's field of
        its name as this class's own flag would read it: a text refused in argparse's words, naming the flag."""
        fields, readers = {f.name: f for f in dataclasses.fields(cls)}, _readers(cls)
        values = {}
        for name, text in given.items():
            flag, choices = f"argument --{name.replace('_', '-')}", fields[name].metadata.get("choices")
            try:
                values[name] = _parse(fields[name], readers[name], text, check_choices=False) \
                    if isinstance(text, str) else text
            except ValueError as err:
                raise ValueError(f"{flag}: {_flag_wording(str(err))}") from None
            if isinstance(text, str) and choices and values[name] not in choices:  # as argparse's `choices` says it
                raise ValueError(f"{flag}: invalid choice: {text!r} (choose from {', '.join(map(repr, choices))})")
        return values

    @classmethod
    def parse_assignments(cls, assignments: Iterable[str]) -> dict[str, Any]:
        """`KEY=VALUE` strings (`--option`) as values of this class's fields."""
        values = {}
        fields, readers = {f.name: f for f in dataclasses.fields(cls)}, _readers(cls)
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise ValueError(f"an option is KEY=VALUE, got {assignment!r}")
            if key not in fields:
                raise ValueError(f"unknown option {key!r}{did_you_mean(key, fields)}; {cls._valid_names()}")
            if key in values:  # the last one would win silently
                raise ValueError(f"option {key} is given twice")
            try:
                values[key] = _parse(fields[key], readers[key], text)
            except ValueError as err:
                raise ValueError(f"option {key}: {_flag_wording(str(err))}") from None
        return values

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return {name: _jsonable(getattr(self, name)) for name in self.field_names()}

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
        """The settings with `values` in place of the defaults; unknown names are an error. Lists (JSON's, `to_dict`'s)
        are tuples again where the field's annotation says so (`_checked`) or, naming no items, its default is one
        (`_tuples_again`)."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{cls.__name__} settings must be a mapping, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            guess = did_you_mean(unknown[0], cls.field_names()) if len(unknown) == 1 else ""
            raise ValueError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                             f"{guess}; {cls._valid_names()}")
        fields, hints = {f.name: f for f in dataclasses.fields(cls)}, _field_types(cls)
        return cls(**{k: _tuples_again(v, hints.get(k), fields[k].default) for k, v in values.items()})

    def replace(self: T, **changes: Any) -> T:
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def _valid_names(cls) -> str:
        """The names an error lists (not the class's: users name a method, not its settings class)."""
        names = cls.field_names()
        return f"known settings: {', '.join(names)}" if names else "it has no settings"


@contextlib.contextmanager
def named_by_flags(names: Iterable[str]) -> Iterator[None]:
    """A ValueError raised in the block about one of the settings `names`, each given as a flag (the errors of
    `Options` begin with the setting's name: "batch_size must be >= 1"), is raised again naming its flag
    ("--batch-size must be >= 1"): what the user typed."""
    flagged = set(names)
    try:
        yield
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        if name not in flagged:
            raise
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checked(name: str, value: Any, hint: Any) -> Any:
    """`value` if it has the type `hint` names; a numpy integer or real as the Python int or float (a value from
    `np.arange` or `np.linspace`), in a tuple too, and an integer where a real is asked for as that float (trim=0 is
    trim=0.0: one setting, one JSON form, so prompts encoded under either serve both; -0.0 likewise is 0.0);
    otherwise ValueError naming the setting."""
    optional, rest = _without_none(hint)
    if optional:
        if value is None:
            return value
        hint = rest
    if _is_union(hint):  # checked as the member it is, in `_UNION_ORDER` (Union[str, float]: a number as float)
        members = typing.get_args(hint)
        kind = next((kind for kind in _UNION_ORDER if kind in members and _is_a(value, kind)), None)
        if kind is None and all(member in _READERS for member in members):
            raise ValueError(f"{name} must be {' or '.join(member.__name__ for member in members)}, got {value!r}")
        hint = hint if kind is None else kind  # (a Literal member: left to the class's own checks)
    if typing.get_origin(hint) is tuple and isinstance(value, (tuple, list)):  # tuple[float, ...], tuple[float, int]
        # A list (JSON's: `from_dict`, `replace`) is the tuple it stands for, at every depth the annotation names.
        args = typing.get_args(hint)
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args  # each item's type, by position
        if len(items) != len(value):
            raise ValueError(f"{name} must hold {len(items)} values, got {len(value)}: {value!r}")
        return tuple(_checked(name, v, item) for v, item in zip(value, items))
    if hint is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return bool(value)
    if hint is int:
        value = _unboxed(value)
        integer(name, value)
    elif hint is float:
        value = _real(name, value) if _is_number(value) else value
        finite(name, value)
    elif hint is str and not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {value!r}")
    return value


def _is_union(hint: Any) -> bool:
    """Union[X, Y] or X | Y (Optional[X] and X | None among them)."""
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _without_none(hint: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] or X | None; (True, None) where more than one type is left besides None
    (Optional[Union[X, Y]]); (False, hint) for a hint that does not allow None."""
    if not (_is_union(hint) and type(None) in typing.get_args(hint)):
        return False, hint
    rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return True, rest[0] if len(rest) == 1 else None


def _tuples_again(value: Any, hint: Any, default: Any) -> Any:
    """`value` as read back from JSON, which has no tuples (`to_dict`; `replace` too), for a field whose annotation
    names no tuple's items (a bare `tuple`, none) but whose default, or annotation, is a tuple: each list in it a
    tuple again, at every depth. Annotated tuples (tuple[X, ...], tuple[X, Y], Optional of them) are made so by the
    class's checks (`_checked`)."""
    hint = _without_none(hint)[1]
    names_items = typing.get_origin(hint) is tuple
    if isinstance(value, list) and not names_items and (hint is tuple or isinstance(default, tuple)):
        return tuple(_tuples_again(item, tuple, ()) for item in value)
    return value


# The order a union's members take a value in, from text (`_union_reader`) or from Python and JSON (`_checked`).
_UNION_ORDER = (float, int, bool, str)
_READERS: dict[type, Callable[[str], Any]] = {bool: parse_bool, int: int, float: float, str: str}


def _reader_of(hint: Any) -> Optional[Callable[[str], Any]]:
    """How text becomes a value of the type `hint` names, as the package's own settings read it where they say so
    (`parse=`): bool, int, float and str; Optional[X] as `parse_optional`, tuple[X, ...] as `parse_tuple` of X's
    reader, a fixed tuple[X, X] as that of exactly its length; a Literal of one type as that type; a Union of these
    four without None (Union[str, float]) as `_union_reader`. None where the hint names none (a bare `tuple`, a tuple
    of mixed types, Optional[Union[X, Y]], another class)."""
    if hint in _READERS:
        return _READERS[hint]
    optional, rest = _without_none(hint)
    if optional:
        read = _reader_of(rest)
        return None if read is None else parse_optional(read)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        read = _item_reader(args[0])
        return None if read is None else parse_tuple(read)
    if typing.get_origin(hint) is tuple and len(set(args)) == 1 and args[0] is not Ellipsis:  # tuple[X, X]
        read = _item_reader(args[0])
        return None if read is None else parse_tuple(read, len(args))
    if typing.get_origin(hint) is typing.Literal and len({type(arg) for arg in args}) == 1:
        return _reader_of(type(args[0]))
    if _is_union(hint) and all(arg in _READERS for arg in args):
        return _union_reader(args)
    return None


def _union_reader(members: tuple[type, ...]) -> Callable[[str], Any]:
    """The reader of a Union of bool, int, float and str: text as the first of its members, in the order float, int,
    bool, str, that reads it, as JSON's and Python's values are taken (`_checked`: a number where the union has a
    number type; Union[str, float] reads "0.5" as 0.5 and "mean" as "mean"); where none reads it, the first one's
    refusal ("invalid float value: 'x'")."""
    readers = [_READERS[kind] for kind in _UNION_ORDER if kind in members]

    def read(text: str) -> Any:
        refusal = None
        for read_as in readers:
            try:
                return read_as(text)
            except ValueError as err:
                refusal = refusal or err
        raise refusal

    return read


def _item_reader(hint: Any) -> Optional[Callable[[str], Any]]:
    """The reader of one item of a tuple read from comma-separated text: none for a tuple (Optional or not), whose
    commas would be the outer tuple's."""
    return None if typing.get_origin(_without_none(hint)[1]) is tuple else _reader_of(hint)


@functools.cache
def _readers(cls: type) -> dict[str, Callable[[str], Any]]:
    """How each field of the settings class `cls` reads the text of its flag or `--option`: its `parse`, else the one
    its annotation names (`_reader_of`), else (but for a union) its default's type (bool, int, float or str). A
    field with none could not be set from the command line though Python and JSON set it: its class is refused, in
    one line, as it is first used (its first settings made, its flags registered, an option read)."""
    hints = _field_types(cls)
    readers = {}
    for f in dataclasses.fields(cls):
        read = f.metadata.get("parse") or _reader_of(hints.get(f.name))
        # not for a union _reader_of cannot read (Union[Literal["mean"], float]): its default's type would read
        # "0.5" as the text where Python and JSON give the number
        if read is None and isinstance(f.default, (bool, int, float, str)) and not _is_union(hints.get(f.name)):
            read = parse_bool if isinstance(f.default, bool) else type(f.default)
        if read is None:
            hint = hints.get(f.name)
            shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise TypeError(f"setting {f.name} of {cls.__name__} is of type {shown}, which does not say how to read "
                            f"it from text (--option {f.name}=VALUE): give setting(..., parse=...)"
                            f"{_example_parse(hint, f.default)}")
        readers[f.name] = read
    return readers


def _example_parse(hint: Any, default: Any) -> str:
    """", e.g. parse=tclip_jax.settings.parse_tuple(int)" for a refused tuple field whose items are of one type
    with a reader, as its annotation says (tuple[int, Path] has none) or else its default's items (a bare `tuple` of
    (1, 2)); "" where none is known (a class of the user's, items of mixed types or none)."""
    hint = _without_none(hint)[1]
    if typing.get_origin(hint) is tuple:
        kinds = {arg for arg in typing.get_args(hint) if arg is not Ellipsis}
    else:
        kinds = {type(item) for item in default} if isinstance(default, tuple) else set()
    read = _READERS.get(kinds.pop()) if len(kinds) == 1 else None
    if read is None:
        return ""
    return f", e.g. parse=tclip_jax.settings.parse_tuple({'tclip_jax.settings.' * (read is parse_bool)}" \
           f"{read.__name__})"


def _unboxed(value: Any) -> Any:
    """A numpy integer or real as Python's (`np.int64(2)` -> 2); anything else as it is."""
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def _real(name: str, number: Any) -> float:
    """`number` as a Python float; a zero as 0.0 (-0.0 == 0.0, but its JSON form and label differ: prompts encoded
    under trim=-0.0 were refused by a TCLIP of trim=0.0)."""
    try:
        value = float(number)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{name} must be a finite number, got {number!r}") from None
    return 0.0 if value == 0 else value


def _is_a(value: Any, kind: type) -> bool:
    """Whether `value` is of `kind`, one of bool, int, float and str, numpy's scalars included (a bool is no int)."""
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return _is_number(value) if kind is float else isinstance(value, kind)


def _is_number(value: Any) -> bool:
    """An int or a real, Python's or numpy's; not a bool (True is not a trim of 1.0)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _parse(f: dataclasses.Field, read: Callable[[str], Any], text: str, check_choices: bool = True) -> Any:
    """`text` read by `read` (the field's reader, `_readers`), checked against the field's choices."""
    meta = f.metadata
    value = read(text)
    if check_choices and meta.get("choices") and value not in meta["choices"]:
        shown = ", ".join(str(choice) if choice != "" else "''" for choice in meta["choices"])  # '' visible
        raise ValueError(f"must be one of {shown}, got {text!r}")
    return value


def _argparse_type(f: dataclasses.Field, read: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return _parse(f, read, text, check_choices=False)  # argparse checks and lists `choices` itself
        except ValueError as err:
            raise argparse.ArgumentTypeError(_flag_wording(str(err))) from None
    convert.__name__ = f.name  # argparse names the type in its error messages
    return convert


# What int() and float() say of a text that is not a number: the repr of the text follows.
_NOT_A_NUMBER = re.compile(r"invalid literal for (int)\(\) with base 10: (.*)"
                           r"|could not convert string to (float): (.*)", re.DOTALL)


def _flag_wording(message: str) -> str:
    """`message`, or argparse's wording of int()'s or float()'s refusal of a flag's text (as for `type=int`:
    "invalid int value: 'abc'", not "invalid literal for int() with base 10: 'abc'")."""
    refused = _NOT_A_NUMBER.fullmatch(message)
    if refused is None:
        return message
    kind, text = refused.group(1, 2) if refused.group(1) else refused.group(3, 4)
    return f"invalid {kind} value: {text}"


def _show(value: Any) -> str:
    if isinstance(value, bool):  # as a --x/--no-x pair's default reads, and argparse's own flags' helps say
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
