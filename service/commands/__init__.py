"""Subcommands of the `gptserve` command line, one module each."""
