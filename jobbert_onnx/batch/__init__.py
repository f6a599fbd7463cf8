"""Batch jobs on top of the runtime: `embed` files of texts, `match` titles to a taxonomy."""
