"""alignfuse.experiments: datasets, feature cache, the Trainer, evaluators, configs, CLI, reports."""
