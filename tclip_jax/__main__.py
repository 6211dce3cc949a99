import sys

from tclip_jax.cli import program

sys.exit(program())
