"""`python -m catpatch.toy {train,sample,check}`: the toy's command line
(`catpatch.trained.cli`)."""

from ..trained.cli import run_module

if __name__ == "__main__":
    run_module("toy")
