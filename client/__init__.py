"""Python client SDK for sessiond (in progress)."""
