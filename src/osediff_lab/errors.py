"""Errors a user can act on: each message names the config key or file and the fix."""


class ConfigError(ValueError):
    """A configuration that cannot work, detected before training starts."""


class MissingWeightsError(FileNotFoundError):
    """A weight file or directory the run needs is not on disk."""
