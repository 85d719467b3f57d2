"""`python -m sdworker` runs the command line."""

from sdworker.cli import main

main()
