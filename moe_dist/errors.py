"""Errors that reach the user as one clear line, never a deep traceback.

Everything the user can get wrong (a config key, a data file, a checkpoint, the launch
environment) raises a subclass of MoeDistError whose message names the file or key.
`python -m moe_dist.train` prints these as `error: ...` and exits with status 2.
"""


class MoeDistError(Exception):
    """Base class of user-facing errors."""


class ConfigError(MoeDistError):
    """A config file, key or value is wrong; the message names the key."""


class DataError(MoeDistError):
    """A corpus, shard, manifest or tokenizer file is missing or wrong; names the file."""


class CheckpointError(MoeDistError):
    """A checkpoint is missing, incomplete or does not match the run; names the file."""


class LaunchError(MoeDistError):
    """The launch environment (ranks, devices, run directory) is unusable."""
