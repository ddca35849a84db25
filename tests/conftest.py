"""Strict settings for the whole suite: no implicit rank promotion."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
