"""Command line: ``ckpt`` / ``python -m ckpt`` (see docs/reference/cli.md).

    ckpt ls DIR            the checkpoints of a run, and why each is kept
    ckpt show FILE         one checkpoint: header, objects, extra (--tensors: every tensor)
    ckpt verify DIR|FILE   checksums (exit 1 if anything is damaged)
    ckpt prune DIR ...     apply a retention policy (deletes only with --yes)
    ckpt diff A B          tensor by tensor, hyper-parameters, metrics
    ckpt export FILE --to OUT.safetensors|OUT.pt
    ckpt plot DIR --metric NAME [-o curve.png]

Exit status: 0 ok, 1 a check failed (damage, an unsafe file), 2 a usage mistake. A
mistake prints one line ``ckpt: error: ... (hint: ...)``: no traceback, and ckpt's
warnings are printed as one-line notes, never as Python warning text.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from pathlib import Path
from typing import List, NoReturn, Optional

from ..errors import CheckpointNotFoundError, CkptError, ConfigError, one_line
from . import export, inspect, listing, plot
from .common import UsageError

SUMMARY = """See, check, prune, compare, export and plot the checkpoints of a run directory.

""" + __doc__.split("\n\n")[1] + """

Exit status: 0 ok, 1 a check failed, 2 a usage mistake."""
_PACKAGE = str(Path(__file__).resolve().parent.parent)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ckpt: error: ...``) and examples kept as written."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        text = kwargs.get("description")
        if isinstance(text, str):  # prose is wrapped; indented blocks (command lists) are kept
            kwargs["description"] = "\n\n".join(
                block if block.startswith(" ") else textwrap.fill(" ".join(block.split()), 88)
                for block in text.split("\n\n"))
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        print(f"ckpt: error: {message} (hint: `{self.prog} --help` shows the usage and an example)",
              file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="ckpt", description=SUMMARY,
               epilog="example:\n  ckpt ls runs/exp1\n  ckpt <command> --help")
    sub = p.add_subparsers(dest="command", required=True, metavar="<command>")
    for module in (listing, inspect, export, plot):
        module.add(sub)
    return p


def exit_status(e: BaseException) -> int:
    """2 for a user mistake (a bad argument, nothing there), 1 for a failed check."""
    if isinstance(e, (UsageError, ConfigError, CheckpointNotFoundError)):
        return 2
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return 2
    return 1


def _notes(caught: List[warnings.WarningMessage]) -> None:
    seen = set()
    for w in caught:
        if not os.path.abspath(w.filename).startswith(_PACKAGE):
            continue  # torch's and other libraries' warnings are not for this user
        text = " ".join(str(w.message).split())
        if text not in seen:
            seen.add(text)
            print(f"ckpt: note: {text}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = int(args.run(args))
        except KeyboardInterrupt:
            code = 130
        except BrokenPipeError:  # `ckpt ls DIR | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more is printed
            code = 0
        except (CkptError, OSError) as e:
            print(f"ckpt: error: {one_line(e)}", file=sys.stderr)
            code = exit_status(e)
        except Exception as e:  # a bug in ckpt, not the user's mistake: still one line
            print(f"ckpt: error: unexpected {type(e).__name__}: {one_line(e)} (hint: this is a bug in ckpt; "
                  "please report it with the command that caused it)", file=sys.stderr)
            code = 1
        finally:
            sys.stdout.flush() if not sys.stdout.closed else None
    _notes(caught)
    return code


if __name__ == "__main__":
    sys.exit(main())
