"""SkyPilot task templates and the default watch list: package data, read through importlib.resources."""
