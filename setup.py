"""The metadata and the build system are in pyproject.toml; this file only lets tools that
still call ``setup.py`` find them."""

from setuptools import setup

setup()
