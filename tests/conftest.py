"""Shared pytest setup for the StreamKL tests: makes ``tests/helpers.py`` importable whatever the import mode."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
