"""``python -m fastpeft`` is the ``fastpeft`` command."""

from .cli import main

raise SystemExit(main())
