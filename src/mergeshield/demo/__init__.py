"""The built-in demonstration on the packaged all-MiniLM-L6-v2 and real labelled data."""

from mergeshield.demo._run import run_demo

__all__ = ["run_demo"]
