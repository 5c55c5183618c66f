"""``python -m storaged.bench NAME`` (see storaged.bench.BENCHMARKS)."""

import sys

from storaged.bench import main

sys.exit(main())
