"""Find and explain super weights in scGPT models of Alzheimer's disease brain cells."""

__version__ = "0.1.0"
