"""The version of `ran_peft`, in a module of its own so that `ran_peft.config` reads it without importing
the package (which imports `ran_peft.config`).
"""

__version__ = "0.1.0"
