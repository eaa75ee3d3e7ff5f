"""``python -m bench.run [--quick] [--out FILE.md]``: mirror vs distribution proxy vs direct.

``python -m bench.run --zone [--quick]``: a zone of nodes instead (:mod:`bench.zone`).

The work lives in :mod:`bench.harness` (orchestration) and :mod:`bench.load` (clients).
Nothing heavy is imported at module level: the load generators are spawned processes,
and ``multiprocessing``'s spawn re-runs this module (as ``__mp_main__``) in each child.
"""

import sys

if __name__ == "__main__":
    if "--zone" in sys.argv[1:]:
        from bench.zone import main as zone_main

        sys.exit(zone_main([arg for arg in sys.argv[1:] if arg != "--zone"]))
    from bench.harness import main

    sys.exit(main())
