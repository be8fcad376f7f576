"""scGPT-compatible model, tokens, checkpoint IO, training loops and spike tracking."""
