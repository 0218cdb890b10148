"""Group-relative policy optimisation (TRL GRPOTrainer loss types): losses, one-step prediction, toys."""
