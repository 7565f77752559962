"""Generation and the HTTP server. Imports nothing from training."""
