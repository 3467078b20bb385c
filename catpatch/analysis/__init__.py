"""Measuring tools: code that instruments a CAT patch to explain its results.

Nothing here is on CAT's own path; `apply_cat` never imports it. See `error_split` (where
CAT's error comes from) and `heterogeneity` (how unevenly the unpatched output changes over
the tokens, step by step).
"""
