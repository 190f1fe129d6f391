"""Conversion tools run from the repository root (`python -m converters.convert ...`)."""
