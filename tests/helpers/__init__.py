"""Test helpers, imported one way: ``from tests.helpers.X import ...`` (the repository root is on sys.path
under ``python -m pytest``)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
