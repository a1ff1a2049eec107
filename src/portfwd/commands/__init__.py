"""The commands people run, one module each (with what only they use): check, sync,
status, show, doctor, trace, import, install, add/remove, docs.
"""
