"""The errors a user can fix, as one family: `fit3d` prints them as a message, without a traceback.

Every stage raises a `UserError` subclass for a bad input (a file, a folder, an option, an
artifact made with other settings): the message names the input and says how to proceed, in one
paragraph. `fit3d_hf.cli` catches `UserError` around every command, prints the message and exits
with `USER_ERROR_EXIT_CODE`; every other exception is a bug and keeps its traceback. `--debug`
or `FIT3D_DEBUG=1` shows the traceback of a user error too.

Each subclass also derives from the built-in exception that callers of the library already
catch (`ValueError`, `FileNotFoundError`, `FileExistsError`), so `except ValueError` keeps working.
"""

# The exit code of a refused input: argparse uses 2 for a bad command line, and a bad input is the same kind of error.
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """An input the user can fix; the message names it and the fix."""


class InputError(UserError, ValueError):
    """A file, option or dataset whose content cannot be used as it is."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file, folder or Hub id that does not exist."""


class OutputError(UserError, FileExistsError):
    """An output folder that cannot be written: a file, not writable, or holding another run's artifacts."""


class OutputBusyError(OutputError):
    """An output folder that another live run is writing (its lock is held)."""


class ProvenanceError(InputError):
    """An artifact made with other settings (backbone, seed, configuration, upstream artifact) than this run."""


class ResultsError(InputError):
    """Results that are empty or not numbers (NaN): nothing to report."""
