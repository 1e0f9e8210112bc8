"""`python -m pfanet COMMAND ...` is the `pfanet` command, e.g. `torchrun --nproc-per-node 4 -m pfanet predict-shard`."""

import sys

from .cli import main

sys.exit(main())
