"""``python -m tether.bench``: the same as ``tether bench``."""

import sys

from . import main

sys.exit(main())
