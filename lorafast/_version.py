"""The package version, read by pyproject.toml (setuptools dynamic version) and lorafast.__version__."""
__version__ = "0.1.0"
