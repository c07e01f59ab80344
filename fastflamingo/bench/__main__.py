"""``python -m fastflamingo.bench``: the same as ``fastflamingo bench``, errors included."""
import sys

from .cli import main

sys.exit(main())
