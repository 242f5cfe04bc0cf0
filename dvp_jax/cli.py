"""The one way a tool's command line is written: absl flags in a ``flags.FlagValues`` of the
tool's own (so that several tools import into one process without duplicate-flag errors),
parsed by ``parse``; user errors become one line by ``run``.

    FLAGS = flags.FlagValues()
    flags.DEFINE_integer("batch", 64, "Global batch.", flag_values=FLAGS)
    cli.define_verbosity(FLAGS)

    def main(argv=None) -> int:
        args = cli.parse(FLAGS, argv, prog="python -m dvp_jax.tool", doc=__doc__)
        ...

    if __name__ == "__main__":
        sys.exit(cli.run(main))

- ``--help`` (``-h``, ``-?``, ``--helpshort``, ``--helpfull``) prints ``usage: PROG``, the
  module docstring and the flags on stdout and exits 0;
- a bad flag (unknown, malformed, missing required value) prints ``error: ...`` in one line
  on stderr and exits 2;
- an error a user can fix (``errors.USER_ERRORS``) raised by the tool: ``run`` prints
  ``error: ...`` in one line on stderr and returns 2; anything else keeps its traceback.

``dvp_jax.main`` and ``dvp_jax.evaluate`` are absl apps on the global ``flags.FLAGS`` (their
``--config`` comes from ml_collections' config_flags); ``console.exit_on_help`` serves them.
"""
from __future__ import annotations

import sys
import types
from typing import Callable, Sequence

from absl import flags

from dvp_jax import errors

HELP_FLAGS = ("-h", "--help", "--helpshort", "-?", "--helpfull")

USAGE_EXIT = 2  # Exit code of a bad command line or of a user error.


def define_verbosity(flag_values: flags.FlagValues) -> None:
    """``--verbosity`` / ``-v`` with absl's meaning (see ``console.library_level``)."""
    flags.DEFINE_integer("verbosity", None, "show library log lines on the console: -1 warnings, "
                         "0 info, 1 debug (default: errors only)", short_name="v",
                         flag_values=flag_values)


def usage_text(flag_values: flags.FlagValues, prog: str, doc: str | None,
               positional: str = "") -> str:
    """``usage: PROG [POSITIONAL] [flags]``, the docstring and every flag with its help."""
    head = f"usage: {prog}{' ' + positional if positional else ''} [flags]"
    listed = flag_values.get_help(include_special_flags=False).splitlines()
    # absl heads the list with the defining module's file name: not for users.
    listed = [line for line in listed if line.startswith(" ")]
    return "\n\n".join(part for part in (head, (doc or "").strip(),
                                         "flags:\n" + "\n".join(listed).strip("\n"))
                       if part)


def fail(message: str) -> None:
    """One line ``error: MESSAGE`` on stderr, then exit 2 (a bad command line)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, *, prog: str,
          doc: str | None, positional: str = "", min_positional: int = 0,
          max_positional: int | None = 0) -> types.SimpleNamespace:
    """Parses ``argv`` (without the program name; None: ``sys.argv[1:]``) into a namespace of
    every flag's value plus ``positional``: the list of the other arguments.

    Flags left out take their defaults, also when a process parses several times (tests).
    ``--help``: usage on stdout, exit 0. A bad flag or a wrong number of positional arguments
    (between ``min_positional`` and ``max_positional``; None: no upper bound): ``fail``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=")[0] in HELP_FLAGS for a in argv):
        print(usage_text(flag_values, prog, doc, positional))
        sys.exit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values([prog] + argv)[1:]
    except flags.Error as e:
        fail(str(e))
    if len(rest) < min_positional or (max_positional is not None and len(rest) > max_positional):
        what = positional or "no positional arguments"
        fail(f"expected {what}, got {rest or 'none'} (see {prog} --help)")
    values = {name: value for name, value in flag_values.flag_values_dict().items()
              if flag_values[name].name == name}  # Long names only: '-v' is 'verbosity'.
    return types.SimpleNamespace(**values, positional=rest)


def run(main: Callable[[], int | None]) -> int:
    """Runs a tool's ``main()``; a user error -> ``error: ...`` in one line on stderr and 2.

    Returns the exit code (``main``'s int, 0 for anything else).
    """
    try:
        code = main()
    except errors.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    return code if isinstance(code, int) else 0
