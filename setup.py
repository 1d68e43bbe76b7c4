"""Build shim: all metadata lives in setup.cfg (setuptools reads it)."""

from setuptools import setup

setup()
