"""`python -m tclip_jax`, and the installed `tclip` command (setup.cfg's console script names `main`): both come
here first, so that a Ctrl-C while numpy and the command modules load ends in one line, not a traceback."""
import sys


def main() -> int:
    try:
        from tclip_jax.cli import program
    except KeyboardInterrupt:
        print("tclip: interrupted", file=sys.stderr)
        return 130
    return program()


if __name__ == "__main__":
    sys.exit(main())
