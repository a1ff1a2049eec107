"""The run directory (/run/portfwd): every file portfwd keeps there, its format, its
atomic writes and its lock.
"""
