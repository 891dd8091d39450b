"""Concurrency primitives with no knowledge of sessions or sockets: shared by actors/ and transport/."""
