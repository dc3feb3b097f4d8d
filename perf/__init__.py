"""Benchmarks: run as `python -m perf.<script>` from the checkout (`make bench` runs them all)."""
