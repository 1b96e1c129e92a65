"""``python -m medusa_jax.aot``: see :mod:`medusa_jax.aot.command`."""

import sys

from medusa_jax.aot.command import main

if __name__ == "__main__":  # importing the module (a package walk) must not run the command
    sys.exit(main())
