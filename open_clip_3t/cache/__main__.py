"""`python -m open_clip_3t.cache`: see cli.py."""
import sys

from .cli import main

sys.exit(main())
