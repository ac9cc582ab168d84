"""The Redis store: the only package that talks to Redis (the client, its commands and the Lua
scripts under ``scripts/``). Imports only ``core``."""
