"""`tclip sweep coco|imagenet-s|synthetic --method M --model M --data PATH --out DIR [...]`.

Runs (or with --resume continues) an evaluation sweep and writes DIR/report.md and DIR/report.json. Several
processes (`jax.distributed`, --coordinator/--num-processes/--process-id, or --distributed on a cluster
that JAX detects) each take their own share and process 0 writes the merged report.
"""
from __future__ import annotations

import argparse
import pathlib

DATASETS = ("coco", "imagenet-s", "synthetic")
SYNTHETIC_SCENES = 1000  # held-out scenes in a synthetic sweep unless --limit says fewer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--method", default="tclip", help="'tclip' or 'package.module:factory' (default: tclip)")
    parser.add_argument("--model", help="CLIP checkpoint, as `load_clip` takes it (default: the embedded model)")
    parser.add_argument("--data", help="dataset root: COCO (annotations/instances_val2017.json + val2017/), a TFDS "
                        "data_dir with --coco-source tfds, or ImageNet-S (validation/, validation-segmentation/)")
    parser.add_argument("--out", required=True, help="results folder (records, sweep.json, report.md/json)")
    parser.add_argument("--limit", type=int, help="only the first N samples")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    parser.add_argument("--batch-size", type=int, default=8, help="images per device step over all local devices")
    parser.add_argument("--workers", type=int, default=2, help="loader threads and host post-processing threads")
    parser.add_argument("--save-vis", type=int, default=0, metavar="N", help="pictures of the first N images' units")
    parser.add_argument("--template", help="prompt template with one '{}' for the class name (default: the bare name)")
    parser.add_argument("--split", type=int, choices=(50, 300, 919), help="ImageNet-S split (required for imagenet-s)")
    parser.add_argument("--coco-source", choices=("raw", "tfds"), default="raw", help="COCO files or TFDS coco/2017")
    parser.add_argument("--crowd", choices=("keep", "drop"), default="keep",
                        help="COCO crowd boxes count as ground truth (keep, gScoreCAM) or are removed (drop)")
    parser.add_argument("--box-rule", choices=("component", "contour"), default="component",
                        help="box from the largest connected component (TCLIP) or largest contour box (gScoreCAM)")
    parser.add_argument("--pg-tolerance", type=int, default=1, help="pointing-game tolerance in pixels (TorchRay: 15)")
    parser.add_argument("--threshold", default="mean", type=_threshold,
                        help="segmentation foreground threshold: mean, otsu, gmm or a number in [0, 1]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() from the environment")
    group.add_argument("--coordinator", help="coordinator address HOST:PORT")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)


def run(args: argparse.Namespace) -> int:
    _init_distributed(args)
    from tclip_jax.sweep import EvalOptions, RunOptions, build_method, run_sweep

    dataset, source = _open_dataset(args)
    method = build_method(args.method, args.model, dataset.class_names, args.template)
    config = {"source": source, "model": args.model, "template": args.template}
    evaluation = EvalOptions(args.box_rule, args.pg_tolerance, args.threshold)
    options = RunOptions(args.batch_size, args.workers, args.limit, args.resume, args.save_vis, not args.no_progress)
    result = run_sweep(dataset, method, args.out, config, evaluation, options)
    if result.report is not None:
        print((pathlib.Path(args.out) / "report.md").read_text())
    return 0


def _open_dataset(args: argparse.Namespace):
    """The dataset the arguments name, and a description of its source for sweep.json."""
    from tclip_jax import datasets

    if args.dataset == "synthetic":
        if args.data is not None:
            raise ValueError("synthetic scenes are generated: --data is not used (size the sweep with --limit)")
        return datasets.synthetic_dataset(args.limit or SYNTHETIC_SCENES), "held-out synthetic scenes"
    if args.data is None:
        raise ValueError(f"{args.dataset} needs --data (the dataset's root folder)")
    data = str(pathlib.Path(args.data).resolve())
    if args.dataset == "coco":
        if args.coco_source == "tfds":
            return (datasets.tfds_coco_dataset(data, crowd=args.crowd),
                    f"tfds coco/2017 validation in {data}, crowd {args.crowd}")
        return datasets.coco_dataset(data, crowd=args.crowd), f"coco val2017 in {data}, crowd {args.crowd}"
    if args.split is None:
        raise ValueError("imagenet-s needs --split 50, 300 or 919 (label ids index that split's classes)")
    return datasets.imagenet_s_dataset(data, args.split), f"imagenet-s{args.split} validation in {data}"


def _init_distributed(args: argparse.Namespace) -> None:
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if args.distributed or args.coordinator is not None:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def _threshold(text: str) -> str | float:
    if text in ("mean", "otsu", "gmm"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be mean, otsu, gmm or a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a numeric threshold lies in [0, 1), got {value}")
    return value
