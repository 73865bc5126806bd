"""Offline evaluation: metrics, baseline systems, the reference pipeline and ``make eval``.

Entry point: ``python -m training.evaluation --data <dir> [--checkpoint <dir>]`` (see
:mod:`training.evaluation.__main__`). Protocol: :mod:`training.evaluation.protocol`.
"""
