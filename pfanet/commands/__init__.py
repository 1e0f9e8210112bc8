"""The `pfanet` commands, one module each over the library: `add(subparsers)` declares the command and its flags,
`run(args)` checks what argparse cannot, calls the library and returns the exit status. `pfanet.cli` lists them and
dispatches; `common` holds what several share (the prediction options, `fail`, the extras)."""
