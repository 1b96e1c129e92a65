"""medusa_jax: Medusa multi-head speculative decoding in JAX/Flax."""

import sys as _sys

if "jax" not in _sys.modules:
    # With libtpu installed (the test extra) but no TPU attached, the first `import jax` would
    # probe for one and print several lines of errors; a notebook imports us before jax.
    from medusa_jax.platform import skip_absent_tpu as _skip_absent_tpu

    _skip_absent_tpu()
