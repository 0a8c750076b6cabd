"""Ready-made ``py:`` teachers and students with real pretrained weights that install offline from the package index.

May import: what `models` may.
"""
