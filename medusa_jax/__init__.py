"""medusa_jax."""
