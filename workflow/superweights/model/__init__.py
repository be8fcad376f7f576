"""scGPT-compatible model, checkpoint IO and training loops."""
