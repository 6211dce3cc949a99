"""`tclip convert --from hf|openai|open_clip SRC --out DIR`."""
from __future__ import annotations

import argparse
import pathlib
import time

from tclip_jax.cli.common import CheckpointOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="hub name, Hugging Face folder, OpenAI .pt, "
                        "OpenAI-format .npz/.safetensors, or OpenCLIP checkpoint/folder")
    parser.add_argument("--from", dest="source_format", choices=("hf", "openai", "open_clip"),
                        help="the checkpoint's format, checked against what SRC holds (default: detected); "
                        "for a single state-dict file, openai or open_clip sets the default activation")
    parser.add_argument("--out", required=True, help="folder to write (must not exist unless --overwrite)")
    CheckpointOptions.add_arguments(parser)
    parser.add_argument("--float16", action="store_true", help="store parameters as float16 (half the size; float32 "
                        "weights rounded so are another model: a sweep or ECLIP projections of the original do not "
                        "carry over)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is empty or a converted "
                        "checkpoint holding only what convert writes, and SRC is not inside it (SRC itself may be "
                        "--out: converted in place)")


def run(args: argparse.Namespace) -> int:
    from tclip_jax.files import check_output_folder, held_lock_beside

    options = CheckpointOptions.from_arguments(args)
    out = check_output_folder(args.out, replaced=args.overwrite)
    # Two converts into one new --out at once both found it absent, and the later replaced the earlier's folder:
    # --out is held from before that check until its folder is written, and a second convert meanwhile refused.
    with held_lock_beside(out, "tclip convert"):
        return _convert(args, options, out)


def _convert(args: argparse.Namespace, options: CheckpointOptions, out: pathlib.Path) -> int:
    import numpy as np

    from tclip_jax.checkpoints.folder import CONFIG_FILE, WRITTEN_FILES, is_checkpoint, save_checkpoint
    from tclip_jax.checkpoints.load import load_any, tokenizer_of
    from tclip_jax.files import check_replaceable, unwritten_entries

    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    source = pathlib.Path(args.source).expanduser()
    # A converted folder converted in place (to float16, say) is read whole before the new folder replaces it.
    in_place = out.exists() and source.exists() and source.resolve() == out.resolve()
    if in_place and not is_checkpoint(out):  # a Hugging Face or OpenCLIP folder: replacing it would delete it
        raise ValueError(f"{out} is not a converted checkpoint (it has no {CONFIG_FILE}), and tclip convert works in "
                         "place only on a converted folder; name another --out")
    check_replaceable(out, CONFIG_FILE, "a converted checkpoint", inputs=[] if in_place else [source])
    others = unwritten_entries(out, WRITTEN_FILES) if out.exists() else []
    if others:  # a model card, a training log, notes in tokenizer/: replacing the folder would delete them
        raise ValueError(f"{out} holds {', '.join(others)}, which tclip convert does not write and replacing the "
                         "folder would delete; move them or choose another --out")
    start = time.perf_counter()
    converted = load_any(args.source, source=args.source_format, activation=options.activation)
    tokenizer_of(converted)  # what loading the written folder would refuse, refused before writing it
    # A converted folder converted again (to float16, say) keeps its own record of where its weights came from.
    metadata = {"source": converted.source, "origin": converted.origin, **converted.metadata}
    folder = save_checkpoint(args.out, converted.params, converted.config, metadata=metadata,
                             tokenizer_dir=converted.tokenizer_dir,  # None: the packaged CLIP vocabulary
                             overwrite=True,  # checked above, holding --out
                             storage_dtype=np.float16 if args.float16 else np.float32)
    c = converted.config
    print(f"converted {converted.origin} ({converted.source}): ViT patch {c.patch_size} at {c.image_size}px, "
          f"{c.vision_layers}x{c.vision_width} vision, {c.text_layers}x{c.text_width} text, "
          f"embed {c.embed_dim}, {c.activation}"
          f"{'' if c.normalizes_as_openai else f', pixel mean {list(c.image_mean)} std {list(c.image_std)}'} -> "
          f"{folder} in {time.perf_counter() - start:.1f}s")
    return 0
