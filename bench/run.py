"""``python -m bench.run [--quick] [--out FILE.md]``: mirror vs distribution proxy vs direct.

The work lives in :mod:`bench.harness` (orchestration) and :mod:`bench.load` (clients).
Nothing heavy is imported at module level: the load generators are spawned processes,
and ``multiprocessing``'s spawn re-runs this module (as ``__mp_main__``) in each child.
"""

import sys

if __name__ == "__main__":
    from bench.harness import main

    sys.exit(main())
