"""Benchmarks of the policy bundles against the seed design they replace."""

__all__: list[str] = []
