"""runs: see README.md, Layout."""
