"""The one error type of checkpoint conversion (a ValueError, so CLIs print it as one line)."""


class ConversionError(ValueError):
    """Input that cannot be converted: unsupported model, missing or mismatched tensor, overflow."""
