"""Torch-free measures of one run that the probes compute and the analysis pools: Figure 5
ratios, gradient roles and summaries, one run's figures. Imports only the base."""
