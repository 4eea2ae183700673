"""Verbs of this area, added to ``dspark-lab`` by :mod:`dspark_lab.cli`."""


def add_parsers(subparsers, common) -> None:
    """Add this area's verbs (filled in as the area lands)."""
