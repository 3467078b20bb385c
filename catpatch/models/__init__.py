"""Models for tests, benchmarks and the study: tiny offline pipelines (`tiny`), named
random-weight transformer shapes (`shapes`). The trained toy pipeline stays at `catpatch.toy`.
"""
