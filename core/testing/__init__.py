"""Test doubles shipped with the package (like httpx's mock transport): a scripted stand-in for
an AI coding CLI, used by the demo, the tests and the chart's sample `script` adapter."""
