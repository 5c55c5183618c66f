"""The ``storaged`` command line: one module per area, the root in :mod:`.root`."""

from storaged.cli.root import DEFAULT_DIR, DEMO_DIR, cli, fail, main, run_op, socket_path

__all__ = ["DEFAULT_DIR", "DEMO_DIR", "cli", "fail", "main", "run_op", "socket_path"]
