"""measures: see README.md, Layout."""
