"""How a sweep runs (`RunOptions`), in a module light enough for the command line to import."""
from __future__ import annotations

import dataclasses
from typing import Optional

from tclip_jax.settings import Options, integer, parse_optional, setting
from tclip_jax.synthetic import SYNTHETIC_SCENES


@dataclasses.dataclass(frozen=True)
class RunOptions(Options):
    batch_size: int = setting(8, "images per step, split over the local devices", parse=int)
    workers: int = setting(2, "loader threads, and as many host post-processing threads", parse=int)
    limit: Optional[int] = setting(None, "only the first N samples of the dataset", parse=parse_optional(int),
                                   shown_default=f"every sample; synthetic: {SYNTHETIC_SCENES} scenes; with --resume, "
                                   "the resumed sweep's")
    resume: bool = setting(False, "continue the sweep in --out (with the same flags, or a larger --limit; without "
                           "--limit, its own; refused where --out holds none); samples recorded as errors are tried "
                           "again")
    save_vis: int = setting(0, "pictures of the units of the first N samples, in --out's vis/", parse=int)
    progress: bool = setting(True, "a progress bar", flag=False)  # the command line's: --progress (cli.common)

    def __post_init__(self):
        super().__post_init__()
        integer("batch_size", self.batch_size, 1)
        integer("workers", self.workers, 1)
        if self.limit is not None:
            integer("limit", self.limit, 1)
        integer("save_vis", self.save_vis, 0)
