"""The small language source edits are declared in: where an edit goes in a file (``anchors.py``: found from the
file's syntax tree, never by line number) and what it inserts (``edits.py``: whole lines carrying the ``[METEOR]``
marker, so that they can be told apart and removed byte for byte).

Each model family states the edits ``meteor-plugin patch`` makes to its checkouts in these terms (its
``patches.py``); the patcher (``patcher/``) applies, checks and reverts them. Nothing here knows a family.
"""
