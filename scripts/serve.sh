#!/usr/bin/env bash
# DESIGN.md's name for scripts/bumblechat.sh: the web chat page and the OpenAI-compatible API.
exec "$(dirname "$0")/bumblechat.sh" "$@"
