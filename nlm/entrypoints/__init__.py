"""The container entry points (SageMaker's `docker run IMAGE train|serve`): beside `nlm.cli`, the top layer."""
