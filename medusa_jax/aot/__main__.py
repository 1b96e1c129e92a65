"""``python -m medusa_jax.aot``: see :mod:`medusa_jax.aot.command`."""

import sys

from medusa_jax.aot.command import main

sys.exit(main())
