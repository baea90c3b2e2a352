"""The pure policy core: TLS modes, HAT matching, parameter inheritance, the command gate.

Nothing here does I/O, reads a clock or imports Twisted; every function is a table lookup over plain data,
so that every transport and every test can drive it.
"""
