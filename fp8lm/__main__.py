"""`python -m fp8lm`: the same command line as the `fp8lm` script."""
import sys

from fp8lm.cli import main

if __name__ == "__main__":
    sys.exit(main())
