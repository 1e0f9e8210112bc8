"""`python -m pfanet COMMAND ...` is the `pfanet` command, e.g. `torchrun -m pfanet predict-shard photos/ -o maps/`."""

import sys

from .cli import main

sys.exit(main())
