"""training: see README.md, Layout."""
