"""One module per `nlm` command (see the command contract in docs/ARCHITECTURE.md)."""
