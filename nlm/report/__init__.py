"""Reports over finished (or running) training runs: curves as a PNG, a Markdown summary table."""
