"""What the sub-commands share: the flags that say which CLIP to load and how (`CheckpointOptions`, `ModelOptions`),
progress bars (`--progress`), and, for `tclip explain` and `tclip sweep`, choosing a method and its settings from the
command line.

TCLIP's settings (and the host-step settings every method has) are flags of their own; any method's other
settings are `--option KEY=VALUE`. A flag that the chosen method does not take is an error, not ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from PIL import Image

from tclip_jax.methods import REGISTRY
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.methods.tclip.settings import Settings as TCLIPSettings
from tclip_jax.model.config import ACTIVATIONS
from tclip_jax.settings import Options, integer, named_by_flags, setting


@dataclasses.dataclass(frozen=True)
class CheckpointOptions(Options):
    """How a checkpoint is read (`tclip convert`, and through `ModelOptions` every command that loads a model)."""

    activation: Optional[str] = setting(
        None, "the MLP activation of a checkpoint that does not say it (a bare state dict); a checkpoint that says "
        "its own refuses another", parse=str, choices=ACTIVATIONS,
        shown_default="the checkpoint's own; a bare state dict's is assumed, with a warning")


@dataclasses.dataclass(frozen=True)
class ModelOptions(CheckpointOptions):
    """The model a command loads, and the largest image it decodes (`tclip explain`, `sweep`, `train-eclip`)."""

    model: Optional[str] = setting(
        None, "the CLIP: hub name, Hugging Face / OpenCLIP / converted folder, OpenAI .pt or state dict", parse=str,
        shown_default="the embedded synthetic-scenes model")
    max_pixels: Optional[int] = setting(
        None, "decode images of up to MAX_PIXELS pixels", parse=int,
        shown_default=f"PIL's guard against decompression bombs, {Image.MAX_IMAGE_PIXELS}")

    def __post_init__(self):
        super().__post_init__()
        if self.max_pixels is not None:
            integer("max_pixels", self.max_pixels, 1)

    def set_max_pixels(self) -> None:
        """Sets the decoded-size limit of image files for this process, if `max_pixels` was given (before any image
        header is checked)."""
        if self.max_pixels is not None:
            from tclip_jax.image.io import set_max_pixels

            set_max_pixels(self.max_pixels)


def add_progress_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="progress bars on stderr (default: on when stderr is a terminal; a log file or pipe "
                             "would get every frame of them)")


def progress_bars(args: argparse.Namespace) -> bool:
    """Whether the command shows progress bars: as --progress / --no-progress says, else if stderr is a terminal."""
    return args.progress if hasattr(args, "progress") else sys.stderr.isatty()


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="tclip",
                        help=f"{', '.join(REGISTRY)}, or 'package.module:Class' of a method outside the package "
                             "(default: %(default)s)")
    ModelOptions.add_arguments(parser)
    parser.add_argument("--matmul-dtype", default="float32",
                        help="the dtype of the model's matmul inputs: float32, bfloat16 or float16, or float64 under "
                             "JAX's x64 mode (parameters stay float32; bfloat16 is the fast one on TPU; results record "
                             "it) (default: %(default)s). The precision of float32 matmuls "
                             "is JAX's: set JAX_DEFAULT_MATMUL_PRECISION=float32 in the environment for float32 on "
                             "TPU/GPU (its default runs bfloat16 passes or TF32); results record one that is not the "
                             "default, and a sweep resumes only at its own")
    group = parser.add_argument_group("TCLIP and host-step settings")
    TCLIPSettings.add_arguments(group, as_text=True)  # read by the chosen method's settings (`method_settings`)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the chosen method, of any method (registered or 'package.module:Class'), "
                             "e.g. --option feature_surgery=false (repeatable); the flags under 'TCLIP and host-step "
                             "settings' are TCLIP's settings, and a setting of the chosen method of such a name may "
                             "be given as that flag instead")


def method_settings(method_class, args: argparse.Namespace) -> MethodSettings:
    """The chosen method's settings from the flags given, each text read by the method's own setting of its name (a
    method's `sigma: int` takes --sigma 3 as 3, not TCLIP's 3.0), and the --option assignments."""
    settings_class = method_class.Settings
    given = TCLIPSettings.given_arguments(args)  # texts
    foreign = sorted(set(given) - set(settings_class.field_names()))
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ValueError(f"{flags} {'is not a setting' if len(foreign) == 1 else 'are not settings'} of "
                         f"{method_class.name}; {settings_class._valid_names()}")
    options = settings_class.parse_assignments(args.option)
    both = sorted(set(given) & set(options))
    if both:  # one would win silently
        raise ValueError(f"{', '.join('--' + name.replace('_', '-') for name in both)} and --option "
                         f"{', '.join(both)} set the same setting twice; give each once")
    given = settings_class.parse_flags(given)
    with named_by_flags(given):
        return settings_class.from_dict({**given, **options})


def chosen_method(args: argparse.Namespace) -> tuple[type, MethodSettings]:
    """The method class the arguments name and its settings, checked (as argparse checks flags) before anything is
    read: the model, a sweep's dataset."""
    from tclip_jax import methods
    from tclip_jax.checkpoints.load import matmul_dtype

    try:  # the library's list (float64 only under x64 mode), checked here with JAX imported, not by argparse
        matmul_dtype(args.matmul_dtype)
    except ValueError as err:
        raise ValueError(f"--matmul-dtype {args.matmul_dtype}: {err}") from None
    method_class = methods.get(args.method)
    return method_class, method_settings(method_class, args)


def build_method(args: argparse.Namespace, chosen: Optional[tuple[type, MethodSettings]] = None):
    """The method the arguments name (`chosen`, where already checked) on the model they name."""
    method_class, settings = chosen or chosen_method(args)
    model = ModelOptions.from_arguments(args)
    model.set_max_pixels()
    return method_class.from_pretrained(model.model, activation=model.activation, dtype=args.matmul_dtype,
                                        **settings.to_dict())
