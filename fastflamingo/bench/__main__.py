"""``python -m fastflamingo.bench``: the same as ``fastflamingo bench``."""
import sys

from .cli import main

sys.exit(main())
