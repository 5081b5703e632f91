"""The project's exception types, one per failure kind.

Each carries a message a user can act on; the CLI prints it on one line and
exits with the kind's exit code.
"""


class NodeError(Exception):
    """Base of every error the node reports to its user."""

    exit_code = 1


class ConfigError(NodeError):
    """The configuration is invalid; the message names the place (``rules[2].compress``)."""

    exit_code = 1


class SpoolError(NodeError):
    """The spool cannot be created, read or written."""

    exit_code = 2


class StartupError(NodeError):
    """The node cannot start (port in use, permission denied)."""

    exit_code = 3


class DeliveryError(NodeError):
    """A DICOM peer cannot be reached or refuses the node (e.g. ``dicom-node echo``)."""

    exit_code = 4


class OutboxError(NodeError):
    """A destination's outbox cannot do what was asked (e.g. no such failed instance)."""

    exit_code = 5
