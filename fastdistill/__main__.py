"""``python -m fastdistill``: the same command as ``fastdistill`` (info, selftest, demo)."""

from .cli import main

raise SystemExit(main())
