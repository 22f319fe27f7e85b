"""Labelling with people: a web app that shows clip, image and answer pairs and stores the answers in a database.

``mmalign label serve`` starts it, ``mmalign label push`` enqueues pairs from a preference data file and
``mmalign label export`` writes the answers back as a preference dataset; the ``human`` teacher
(:mod:`mmalign.core.teachers.human`) lets an online run (``mmalign robotics pebble teacher=human``) ask people.
See docs/guide/labelling.md.
"""

from mmalign.label.store import CHOICES, KINDS, Store, StoreError, sqlite_url

__all__ = ["CHOICES", "KINDS", "Store", "StoreError", "sqlite_url"]
