"""`python -m scft_fast.cli SUBCOMMAND ...`, the same as the `scft-fast` console script."""
from . import main

raise SystemExit(main())
