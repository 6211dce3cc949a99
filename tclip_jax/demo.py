"""`make demo`: a held-out synthetic scene with a same-colour pair, its caption explained word by word with the
embedded model, and, per word, whether its box landed on the object the word names (the scene knows the truth)."""
from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

try:
    import numpy as np

    from tclip_jax import synthetic
    from tclip_jax.cli import OneLineErrors, main as tclip
    from tclip_jax.cli.explain import check_replaced, result_folders
    from tclip_jax.evaluation.metrics.boxes import HIT_IOU, box_ious
    from tclip_jax.files import check_output_folder, write_image
    from tclip_jax.image import load_image
except KeyboardInterrupt:  # Ctrl-C while they load, run as a program: one line, not a traceback
    if __name__ != "__main__":
        raise
    print("python -m tclip_jax.demo: interrupted", file=sys.stderr)
    sys.exit(130)

OUT = pathlib.Path("demo_out")
# A colour_twins scene: two objects of one colour that only their shape words tell apart.
DEMO_PROTOCOL = "colour_twins"
DEMO_SEED = synthetic.HELDOUT_SEED_START + 7


def verdicts(scene: synthetic.Scene, words: list[dict]) -> list[str]:
    """One line per named word of the caption: its referents, the box's best IoU with them (the sweeps' IoU), hit
    or miss, and for a miss the object the box overlaps most."""
    names = [f"{o.colour} {o.shape}" for o in scene.objects]
    by_span = {tuple(w["span"]): w for w in words}
    lines = [f"{'word':<10} {'names':<28} {'IoU':>5}  verdict"]
    for word in scene.words:
        box = by_span[(word.start, word.end)]["box_xyxy"]
        ious = box_ious(box, [o.box for o in scene.objects]).tolist()
        own = max(ious[i] for i in word.referents)
        verdict = "hit" if own >= HIT_IOU else "miss"
        if own < HIT_IOU:
            best = max(range(len(ious)), key=ious.__getitem__)
            if ious[best] == 0:
                verdict += ": the box is on no object"
            elif best in word.referents:
                verdict += ": the box is on the right object, but too loose or too tight"
            else:
                verdict += f": the box is on the {names[best]} (IoU {ious[best]:.2f})"
        referents = " / ".join(names[i] for i in word.referents)
        lines.append(f"{word.text:<10} {referents:<28} {own:>5.2f}  {verdict}")
    return lines


def check_scene_replaced(path: pathlib.Path, scene_image: np.ndarray) -> None:
    """Refuses a `path` that exists and is not the demo's scene (a user's picture that writing the scene would
    replace)."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        same = np.array_equal(load_image(path, exif=False), scene_image)
    except (ValueError, OSError):  # not a picture (a folder, a link to nothing, another file)
        same = False
    if not same:
        raise ValueError(f"{path} is not the demo's scene (a picture of yours, or one an older version drew), and "
                         "the demo would replace it; move it or choose another --out")


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineErrors(prog="python -m tclip_jax.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help=f"output folder (default: {OUT})")
    out = parser.parse_args(argv).out
    image_path = out / "scene.png"
    try:  # as `tclip explain` checks its --out: one line, before anything is written
        check_output_folder(out)
        scene = synthetic.protocol_sample(DEMO_PROTOCOL, DEMO_SEED).scene
        check_scene_replaced(image_path, scene.image)
        folder = out / result_folders(out, [str(image_path)])[0]  # where `tclip explain` will put the result
        check_replaced(out, [str(image_path)], [folder.name], page=True)
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    try:  # what the check cannot foresee (a folder that refuses new entries, a full disk): one line too
        out.mkdir(parents=True, exist_ok=True)
        write_image(image_path, scene.image)
    except OSError as err:
        what = f"cannot write {err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
        parser.exit(2, f"{parser.prog}: error: {what}\n")
    print(f"scene: {image_path}  caption: {scene.caption!r}")
    status = tclip(["explain", str(image_path), "--prompt", scene.caption, "--out", str(out)])
    if status != 0:
        return status
    record = json.loads((folder / "result.json").read_text())
    print(f"\nwhere each word's box landed (a hit: IoU >= {HIT_IOU} with an object the word names):")
    print("\n".join(verdicts(scene, record["prompts"][0]["words"])))
    print(f"\nper-word overlays: {folder}/p0_w*.png\ngrid figure:       {folder}/p0_grid.png\n"
          f"result:            {folder}/result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
