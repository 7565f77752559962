"""One module per command: `Options` (the flags) and `run(options) -> exit code`."""
