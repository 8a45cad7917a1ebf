"""The embedded demo: a generated instruction task and tiny models made from it."""
