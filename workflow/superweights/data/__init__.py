"""Data sources, preprocessing and tokenisation."""
