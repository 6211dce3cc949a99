"""Pictures and pages of results.

- `figures`: static pictures (an overlay with its box, a grid figure per prompt naming the method and τ);
- `explorer`: the interactive HTML explorer, one self-contained page per `tclip explain` run (index.html) or a
  notebook output (`ImageResult._repr_html_`), with its assets (`assets/explorer.js`, `assets/explorer.css`).
"""
from tclip_jax.visualize.explorer import (
    DISPLAY_MAX_SIDE,
    INLINE_LIMIT_BYTES,
    MAP_MAX_SIDE,
    Explorer,
    PageWriter,
    View,
    image_entry,
    page_data,
    page_html,
    result_html,
)
from tclip_jax.visualize.figures import (
    Panel,
    draw_box,
    grid_figure,
    method_label,
    model_label,
    normalize,
    overlay,
    prompt_panels,
    result_figure,
    save_figure,
    turbo_lut,
)

__all__ = [
    "DISPLAY_MAX_SIDE",
    "Explorer",
    "INLINE_LIMIT_BYTES",
    "MAP_MAX_SIDE",
    "PageWriter",
    "Panel",
    "View",
    "draw_box",
    "grid_figure",
    "image_entry",
    "method_label",
    "model_label",
    "normalize",
    "overlay",
    "page_data",
    "page_html",
    "prompt_panels",
    "result_figure",
    "result_html",
    "save_figure",
    "turbo_lut",
]
