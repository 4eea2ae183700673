"""dspark-lab tune: search a running job's live policies inside the run (issue 18; docs/tune.md)."""
