"""The one base class of mistakes a user can fix (bad config, missing data, foreign workdir,
wrong checkpoint, NaN). The command lines print such an error's message in one line and exit
with code 2 (the tools through ``cli.run``, the one place that catches USER_ERRORS for them);
anything else is a bug and keeps its traceback.

A leaf module (imports nothing of dvp_jax), so that any layer can raise the errors that several
layers share: ConfigError (config_checks, sharding, trainers) and DataError (the input sources,
caught by the evaluator's command line). An error that one module raises and only its callers
catch (checkpoints.CheckpointError, fileio.WorkdirFileError, loop.NonFiniteError, ...) is
defined beside its raiser, as a subclass of UserError.
"""


class UserError(Exception):
    """A problem with the input the user gave; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value is not allowed."""


class DataError(UserError, ValueError):
    """A data set, split, folder or file is missing or unusable; the message says how to fix it."""


USER_ERRORS = (UserError,)
