"""`python -m layerline.cli`: the command line, as the `layerline` script runs it."""

import sys

from layerline.cli import main

if __name__ == "__main__":
    sys.exit(main())
