"""Register finished models (final/ or export folders) in an MLflow model registry."""
