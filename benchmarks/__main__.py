"""``python -m benchmarks [--scale ci|full]``: the same as ``msstore bench``."""

from .run import main

raise SystemExit(main())
