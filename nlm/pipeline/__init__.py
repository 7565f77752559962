"""Multi-agent pipelines: several students ("agents") trained from one file, side by side (`nlm pipeline run`)."""
