"""Offline side of the platform: data preparation, model definitions and Ray Train jobs.

``training.data`` and ``training.features`` are dependency-light (pandas/pyarrow only, no
torch) because the gateway imports :mod:`core.text` at serving time.
``training.models`` and ``training.train`` need torch, transformers and Ray.
"""
