"""Fixture plugin: its module raises on import (as a plugin with a missing dependency does)."""

raise ImportError("No module named 'toy_vendor_sdk'")
