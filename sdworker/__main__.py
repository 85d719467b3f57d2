"""`python -m sdworker` runs the command line."""

from sdworker.cli import main

if __name__ == "__main__":  # not again in a child process started by spawn or forkserver
    main()
