"""`python -m lora2` is the `lora2` command."""

import sys

from .cli import main

sys.exit(main())
