"""Benchmarks: KotaDB measured side by side with its peers in the same run."""
