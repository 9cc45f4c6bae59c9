"""Decisions: admission, placement and estimates. Pure where possible; no HTTP.

May import ``backends`` types; must not import ``gateway``.
"""
