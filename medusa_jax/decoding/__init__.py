"""Decoding: sampling, the vanilla loop, acceptance rules and the Medusa tree loop."""
