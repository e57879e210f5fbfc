"""mergeflow: fine-tune experts, then merge or compress them into one multi-task model."""

__version__ = "0.1.0"
