"""TTDS-Rec: a generative recommender with twin-tower dynamic semantic IDs.

Library components live here; `stages/` holds the thin DVC entry points and
`ttds_core.cli` the `ttds` command that mirrors them.
"""

__version__ = "0.1.0"
