"""GrowLength pretraining launcher on DeepSpeed."""
