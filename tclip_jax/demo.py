"""`make demo`: draw a held-out synthetic scene and explain its caption with the embedded model."""
from __future__ import annotations

import pathlib
import sys

from tclip_jax import synthetic, visualize
from tclip_jax.cli import main as tclip

OUT = pathlib.Path("demo_out")
DEMO_SEED = synthetic.HELDOUT_SEED_START + 7


def main() -> int:
    scene = synthetic.make_scene(DEMO_SEED)
    OUT.mkdir(exist_ok=True)
    image_path = OUT / "scene.png"
    visualize.save_png(image_path, scene.image)
    print(f"scene: {image_path}  caption: {scene.caption!r}")
    status = tclip(["explain", str(image_path), "--prompt", scene.caption, "--out", str(OUT)])
    if status == 0:
        folder = OUT / image_path.stem
        print(f"per-word overlays: {folder}/p0_w*.png\ngrid figure:       {folder}/p0_grid.png\n"
              f"result:            {folder}/result.json")
    return status


if __name__ == "__main__":
    sys.exit(main())
