"""The soft map's default blur, in a module light enough for the command line to import (TCLIP's settings state
it in their help; `soft.py` blurs with it).

The default Gaussian sigma is this fraction of the map's longer side, in pixels (``soft.py``'s module docstring).
"""
DEFAULT_SIGMA_FRACTION = 0.02
