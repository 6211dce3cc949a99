import sys

from tclip_jax.cli import main

sys.exit(main())
