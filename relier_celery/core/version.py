"""The package version, in core so that every layer can read it without importing the package."""

__version__ = "0.1.0"
