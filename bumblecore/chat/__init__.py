"""The chat format: how a conversation becomes text and tokens (format.py: rendering, the training mask,
the end-of-turn token) and the built-in templates by name (templates.py). The tokenizer, data/, model/ and
inference/ all import it; it imports nothing of the package."""
