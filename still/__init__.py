"""still: turn open-weight language models into small, good, domain-specific models."""

__version__ = "0.1.0"
