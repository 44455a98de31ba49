"""The package version (also in pyproject.toml); part of every prefix-store model fingerprint."""

__version__ = "0.1.0"
