"""Errors a user can act on. Each message is one line that names the file, field or device at fault."""


class MeshError(Exception):
    """Base class: the message is shown to the user as it is, without a traceback."""


class ConfigError(MeshError):
    """A bad model checkpoint, cluster file or command-line value."""


class StageError(MeshError):
    """A stage failed while loading or serving; the message names the device."""
