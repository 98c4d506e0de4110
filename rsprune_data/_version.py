"""The package version, defined here only: ``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``),
``rsprune_data.__version__``, ``rsprune-data --version`` and the report footer import it."""

__version__ = "0.1.0"
