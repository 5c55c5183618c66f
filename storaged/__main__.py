"""`python -m storaged` runs the CLI."""

from storaged.cli import main

main()
