"""Which data a sweep reads (`DatasetOptions`: --split, --coco-source, --crowd, --protocol), in a module light enough
for the command line to import. The choices and defaults live here alone: the dataset modules (`imagenet_s`, `coco`,
`synthetic`) take their split list, crowd modes and default arguments from here, and the command line its flags,
help texts and checks, as `EvalOptions` and `RunOptions` own theirs.

Each option applies to some datasets only (`APPLIES_TO`); a flag given for another dataset is refused, not ignored
(it would seem to have applied). A flag not given leaves the option at its default, and a sweep records the data
read (its `source` in sweep.json: the crowd mode, the protocol, the split) in the words it always has.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import ClassVar, Literal, Optional

from tclip_jax.settings import Options, setting
from tclip_jax.synthetic import DEFAULT_PROTOCOL, PROTOCOLS

SPLITS = (50, 300, 919)  # ImageNet-S's splits (`imagenet_s`)
Crowd = Literal["keep", "drop"]  # what COCO's crowd annotations are (`coco`'s module docstring)
CROWD_MODES: tuple[str, ...] = typing.get_args(Crowd)
DEFAULT_CROWD: Crowd = "keep"  # gScoreCAM's evaluation: a crowd box counts like any other
COCO_SOURCES = ("raw", "tfds")  # COCO's files, or TFDS coco/2017 (coco boxes only)
DEFAULT_COCO_SOURCE = "raw"


def spelled(choices: typing.Sequence[object]) -> str:
    """'50, 300 or 919'."""
    texts = [str(choice) for choice in choices]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} or {texts[-1]}"


@dataclasses.dataclass(frozen=True)
class DatasetOptions(Options):
    split: Optional[int] = setting(None, "ImageNet-S split, which imagenet-s requires", parse=int, choices=SPLITS,
                                   shown_default="none")
    coco_source: str = setting(DEFAULT_COCO_SOURCE, "coco: COCO files or TFDS coco/2017", choices=COCO_SOURCES,
                               shown_default=f"{DEFAULT_COCO_SOURCE}; coco-seg: raw only")
    crowd: Crowd = setting(DEFAULT_CROWD, "coco, coco-seg: crowd boxes count as ground truth (keep, gScoreCAM) or are "
                           "removed (drop; coco-seg: their pixels are left out of their own category's pixel scores; "
                           "the pointing game and energy count them as background)", choices=CROWD_MODES)
    protocol: str = setting(DEFAULT_PROTOCOL, "synthetic: the evaluation protocol, one of " + ", ".join(PROTOCOLS)
                            + " (see tclip_jax/synthetic.py)", choices=PROTOCOLS, metavar="PROTOCOL")

    # The datasets each option applies to (the `tclip sweep` dataset names).
    APPLIES_TO: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "split": ("imagenet-s",), "coco_source": ("coco", "coco-seg"), "crowd": ("coco", "coco-seg"),
        "protocol": ("synthetic",)}

    @classmethod
    def for_dataset(cls, dataset: str, given: Mapping[str, object]) -> "DatasetOptions":
        """The options `given` (flags given, `given_arguments`) for `dataset`, the defaults else; an option of
        another dataset is refused in one line naming its flag ("--crowd applies to coco and coco-seg only, not
        voc")."""
        for name in given:
            using = cls.APPLIES_TO[name]
            if dataset not in using:
                raise ValueError(f"--{name.replace('_', '-')} applies to {' and '.join(using)} only, not {dataset}")
        return cls.from_dict(given)
