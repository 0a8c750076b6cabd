"""Ready-made ``py:`` teachers with real pretrained weights that install offline from the package index."""
