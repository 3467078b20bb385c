"""`python -m catpatch.scenes {train,sample,check}`: the toy's command line for the scenes model."""

from ..toy.__main__ import run_module

if __name__ == "__main__":
    run_module("scenes")
