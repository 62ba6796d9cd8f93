"""The errors a user can cause, in one place: the CLI prints each as one line and exits 2.

Every other module raises these (and re-exports the one it owns, e.g. `jaxft.tasks.DataError`);
anything else reaching the CLI is a bug and keeps its traceback.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and why."""


class ConvertError(ConfigError):
    """An input that cannot be converted; the message names the file, key or tensor."""


class DataError(ValueError):
    """Data that cannot be used; the message names the file, and the line and field if known."""


class TemplateError(ValueError):
    """A template file or a record that does not fit its template."""


class JudgeError(RuntimeError):
    """The judge endpoint failed or replied with something that is not a score."""


class JudgeUnreachable(JudgeError):
    """No reply at all (nobody listening, connection lost, timeout): every later item would
    wait as long again, so a run stops at the first one instead of counting it per item."""


class SaveError(RuntimeError):
    """An output could not be written (a full disk, no permission); says what is kept."""


class OutputExistsError(FileExistsError):
    """An output that exists and was not allowed to be overwritten."""


# What the CLI reports as a one-line error (a missing input file is the user's too).
USER_ERRORS = (ConfigError, DataError, TemplateError, JudgeError, OutputExistsError, SaveError,
               FileNotFoundError)
