"""Hostile input and the public endpoints' defences: fuzzing, malformed bodies, headers, privacy."""
