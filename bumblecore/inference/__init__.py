"""Inference: batched KV-cache generation, the generate and chat commands."""
