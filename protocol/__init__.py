"""The pure pieces of wire protocol v1 (DESIGN §3) that every side shares: server, SDKs, tests."""
