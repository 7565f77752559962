"""The trainer (on HF Trainer), its callbacks, run metadata and the `train` entry point."""
