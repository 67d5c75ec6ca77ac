"""The one training/evaluation loop, checkpoints and logging (arrive with the engine issue)."""
