"""`python -m training.eval`."""

import sys

from training.eval.command import main

sys.exit(main())
