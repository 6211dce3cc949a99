"""`tclip train-eclip --out DIR (--data PATH | --synthetic N)`: train ECLIP's projections on a frozen CLIP
(`tclip_jax.methods.eclip.train`); `--method eclip --option projections=DIR/eclip_projections.safetensors` uses
them."""
from __future__ import annotations

import argparse
import time

from tclip_jax.cli.common import ModelOptions, add_progress_argument, progress_bars
from tclip_jax.methods.eclip.settings import TrainSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ModelOptions.add_arguments(parser)  # --model: the CLIP to train on
    parser.add_argument("--out", required=True,
                        help="folder of the checkpoint (after every epoch) and eclip_projections.safetensors")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="PATH",
                      help="a folder of images with captions.tsv (FILE<TAB>CAPTION per line), or such a .tsv file, "
                           "a .csv (columns path, caption) or .jsonl ({\"path\": ..., \"caption\": ...} per line); "
                           "image paths are relative to the list's folder")
    data.add_argument("--synthetic", type=int, metavar="N", help="the first N synthetic training scenes and captions")
    parser.add_argument("--dino", metavar="PATH_OR_HUB",
                        help="Hugging Face ViTModel (e.g. a DINO) folder or hub name whose last-layer CLS attention "
                             "masks the pooling (default: the CLIP image tower's own)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    add_progress_argument(parser)
    TrainSettings.add_arguments(parser.add_argument_group("training (defaults: the paper's)"))


def run(args: argparse.Namespace) -> int:
    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.methods.eclip.train import ViTAttention, file_pairs, synthetic_pairs, train

    settings = TrainSettings.from_arguments(args)
    model = ModelOptions.from_arguments(args)
    model.set_max_pixels()  # before the images' headers are checked
    pairs = synthetic_pairs(args.synthetic) if args.data is None else file_pairs(args.data)  # checked first
    start = time.perf_counter()
    attention = None if args.dino is None else ViTAttention(args.dino)
    clip = load_clip(model.model, activation=model.activation)
    result = train(clip, pairs, args.out, settings, attention, resume=args.resume, progress=progress_bars(args))
    loss = "" if result.loss is None else f", last loss {result.loss:.4f}"
    steps = f"{result.steps} step{'s' * (result.steps != 1)}"
    print(f"trained ECLIP projections on {pairs.description} ({steps}{loss}) -> {result.path} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
