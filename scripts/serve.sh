#!/usr/bin/env bash
# Another name for scripts/bumblechat.sh (the one the design names): the web chat page and the OpenAI-compatible API.
exec "$(dirname "$0")/bumblechat.sh" "$@"
