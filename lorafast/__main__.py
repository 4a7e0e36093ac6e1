"""``python -m lorafast``: the lorafast command (lorafast/cli.py)."""
import sys

from .cli import main

sys.exit(main())
