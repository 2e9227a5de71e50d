"""The report's analysis, torch-free: runs read back and aggregated, statistics, verdicts on the
paper's claims, confirmation of a declared plan, figures, tables and run-time estimates. Imports
measures and the base."""
