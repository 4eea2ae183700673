"""A package whose ``train`` module ``dspark-lab run -m module_job.train`` runs (tests/test_runtime.py)."""
