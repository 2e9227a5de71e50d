"""Training with Lightning and torch: the LightningModule, data modules, speed settings, the
progress display and the Trainer's argument names. Imports probes, models, runs, measures and the base."""
