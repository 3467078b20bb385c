"""`python -m catpatch.cli.generate ...` (also under torchrun): as `catpatch generate ...`."""

import sys

from . import main

sys.exit(main())
