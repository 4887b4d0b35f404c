"""The GPU speed and memory benchmark behind ``appleswap bench`` (random full-size weights, no downloads).

``settings`` holds the options, ``models`` the random models and one pass of each forward, ``eager``,
``compiled``, ``swaps`` and ``tiers`` the rows, ``table`` the whole table in order and ``cli`` the command.
"""
