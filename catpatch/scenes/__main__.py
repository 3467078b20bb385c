"""`python -m catpatch.scenes {train,sample,check}`: the scenes model's command line
(`catpatch.trained.cli`)."""

from ..trained.cli import run_module

if __name__ == "__main__":
    run_module("scenes")
