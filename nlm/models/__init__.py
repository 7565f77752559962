"""Devices and precision, model and tokenizer loading, vocabulary checks, LoRA targets."""
