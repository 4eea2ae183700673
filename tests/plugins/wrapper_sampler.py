"""Fixture plugin: a new-style wrapper (``wrapper=True``) around the device sampler hook; refused at registration."""

from dspark_lab import hookimpl


@hookimpl(wrapper=True)
def dspark_device_sampler(backend):
    sampler = yield
    return sampler
