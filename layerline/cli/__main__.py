"""`python -m layerline.cli`: the command line, as the `layerline` script runs it."""

import sys

from layerline.cli import main

sys.exit(main())
