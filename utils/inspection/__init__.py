"""What the scripts that use a trained model share: opening its checkpoint, figures, attention
rollout."""
