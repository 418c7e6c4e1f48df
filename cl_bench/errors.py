"""Errors a user can fix. Each message says what went wrong and what to do about it."""


class ClBenchError(Exception):
    """Base class: raised for bad input (config, data, checkpoints); the CLI prints it without a traceback."""


class ConfigError(ClBenchError):
    """A config key is unknown, missing or of the wrong type, or options do not fit together."""


class CompleteRunError(ConfigError):
    """The run folder already holds a complete run of this config (a rerun sweep job keeps it)."""


class DataError(ClBenchError):
    """A dataset folder or file is missing or malformed."""


class CheckpointError(ClBenchError):
    """A checkpoint file is missing, unreadable or does not match the architecture."""


class TrainingDivergedError(ClBenchError):
    """The training loss became NaN or infinite."""


class RunLockedError(ClBenchError):
    """Another live process holds the run folder's lock."""


class StorageError(ClBenchError):
    """The output folder cannot be written (permissions, full disk, quota)."""
