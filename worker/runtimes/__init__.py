"""The code that runs one job inside a pool child process.

``javascript`` runs an analysis in a fresh QuickJS context; ``python`` runs a
whitelisted script as a subprocess. Both take a job message (a dict built by
the executor) and return an outcome dict; ``child`` is the process that
receives messages from the pool and sends outcomes back.
"""
