"""Stores: the on-disk contracts between stages.

Each store kind is owned by exactly one module (``rollouts``, ``cache``); every
command reads and writes it through that module. ``common`` holds the pieces
they share (completion markers, format versions, digests, codecs), ``rundir``
resolves the run-directory layout.
"""
