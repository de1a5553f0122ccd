"""The error hierarchy. Every error carries a message a hospital user can act on."""

from __future__ import annotations


class SynthperfError(Exception):
    """Base of our errors; ``str(err)`` is shown to users in the job and the log."""


class InputMissingError(SynthperfError):
    """A required series (DWI, FLAIR, ...) did not arrive; the message says which."""


class InvalidInputError(SynthperfError):
    """Input arrived but cannot be used (geometry, encoding, units); the message says why."""


class ModelError(SynthperfError):
    """Model weights missing, corrupt or incompatible."""


class DeliveryError(SynthperfError):
    """A destination refused or could not be reached."""
