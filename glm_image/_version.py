"""The version, defined once: pyproject.toml reads it (``[tool.setuptools.dynamic]``) and every
module that reports it imports it from here."""

__version__ = "0.1.0"
