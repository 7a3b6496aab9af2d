"""``python -m core.runner adapter|gate``: the command of adapter and gate Jobs."""

from core.runner.main import main

raise SystemExit(main())
