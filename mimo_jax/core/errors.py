"""Errors a user can hit, named for their cause (shared by every layer above)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or disagrees with the model config."""
