#!/usr/bin/env python3
"""An AI CLI that is down: it crashes on every task (for the circuit-breaker demo)."""

print("broken-cli: connecting to the model service...", flush=True)
print("Traceback (most recent call last):")
print('  File "broken_cli.py", line 6, in <module>')
print("ConnectionResetError: [Errno 104] Connection reset by peer")
raise SystemExit(1)
