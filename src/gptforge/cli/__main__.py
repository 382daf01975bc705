"""`python -m gptforge.cli ...` (as torchrun runs it) is the `gptforge` command."""

import sys

from gptforge.cli import main

sys.exit(main())
