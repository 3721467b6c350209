"""Side-by-side benchmarks against the anchors: ``python -m benchmarks`` (or ``./dev bench``)."""
