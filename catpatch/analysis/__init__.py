"""Measuring tools: code that instruments a CAT patch to explain its results.

Nothing here is on CAT's own path; `apply_cat` never imports it. See `error_split`.
"""
