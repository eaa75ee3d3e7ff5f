"""Side-by-side benchmark: mirror vs distribution's proxy mode vs upstream direct.

Run ``python -m bench.run`` (``--quick`` for a smoke run). See bench/README.md.
"""
