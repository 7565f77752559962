"""The errors a user can cause. The CLI prints their message as one line and exits with `exit_code`."""


class NlmError(Exception):
    """Base of every error caused by the user's input, files or environment."""

    exit_code = 1


class ConfigError(NlmError):
    """A configuration value, flag or config file is wrong."""

    exit_code = 2


class UnsafePathError(ConfigError):
    """A path nlm would write to is inside a system directory or outside the output directory."""


class DataError(NlmError):
    """A data file is missing, unreadable or holds no usable record."""

    exit_code = 2


class ModelLoadError(NlmError):
    """A model or tokenizer cannot be loaded."""


class ModelPathError(ModelLoadError):
    """A local path given as a model is missing or is not a model folder (a run folder, a cache, a file...)."""

    exit_code = 2


class VocabularyMismatchError(NlmError):
    """Teacher and student do not share a tokenizer (and no cross-tokenizer method was chosen)."""

    exit_code = 2


class DeviceError(NlmError):
    """A requested device is not available."""

    exit_code = 2


class RunExistsError(NlmError):
    """A finished or started run would be overwritten."""

    exit_code = 2


class FolderNotOwnedError(RunExistsError):
    """A non-empty folder nlm would write or overwrite was not created by nlm (it has no marker)."""


class TrainingDivergedError(NlmError):
    """The loss became NaN or infinite for too many steps."""
