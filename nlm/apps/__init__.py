"""Applications: what a command does end to end, wired from the library packages below (config, data, models,
distill, training, inference, export). Only the commands (`nlm/commands/`) and the container entry points
import these modules; nothing in the library imports them (tests/test_layers.py checks it)."""
