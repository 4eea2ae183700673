"""Profiles: read Chrome/Kineto traces, classify their events (compute, communication, waits) and say where a step's
time goes per rank; capture them live from a running job (:mod:`.capture`).

Vocabulary: a *trace* is one rank's profiler file; a *track* is one (process, thread) or (device, stream) row of it;
the *timeline* a rank is measured on is its device tracks when the trace has kernels, else its CPU threads.
"""
