"""Forward-only teacher/reference workers: chunked log-probs from hidden states, the Ray worker, tokenizer checks."""
