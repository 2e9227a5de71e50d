"""analysis: see README.md, Layout."""
