"""Errors raised for bad user input. The CLI prints them as one line and exits with code 2."""


class QLIPError(Exception):
    """A problem with the user's input (file, checkpoint, config, ids) described in one line."""


class CheckpointError(QLIPError):
    """A checkpoint cannot be read or does not match the model it should build."""


class ConfigError(QLIPError):
    """A configuration cannot be built into a model or recipe."""


class DataError(QLIPError):
    """Input data (images, id arrays, shards) is unusable."""
