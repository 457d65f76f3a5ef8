"""What a task computes: scores from a loaded model, shared forward passes, the prompt contract, time limits."""
