"""``python -m bulkfetch``: the same as the ``bulkfetch`` console script."""

from .cli import main

raise SystemExit(main())
