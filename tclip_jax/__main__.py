import sys

try:
    from tclip_jax.cli import program
except KeyboardInterrupt:  # Ctrl-C while numpy and the command modules load: one line, not a traceback
    print("tclip: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(program())
