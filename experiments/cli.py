"""How every entry point ends: bad input gives one line `error: ...` on stderr and a non-zero exit status."""

import sys
from collections.abc import Callable, Mapping

from absl import app, flags


def run(
    main: Callable,
    errors: tuple[type[Exception], ...],
    statuses: Mapping[type, int] | None = None,
    prepare_argv: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """app.run(main); an exception of `errors` ends the process with its one-line message and exit status 1,
    or the status `statuses` gives its type (a diverged run, which sweep launchers record rather than retry).
    prepare_argv rewrites the command line before absl parses it; its errors end the same way."""
    try:
        if prepare_argv:
            app.run(main, flags_parser=lambda argv: flags.FLAGS(prepare_argv(argv)))
        else:
            app.run(main)
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(next((code for kind, code in (statuses or {}).items() if isinstance(error, kind)), 1))
