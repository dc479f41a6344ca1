"""Names the command line shows before it imports torch: the built-in data sets and the registered methods.

A leaf (it imports nothing), so that `diffusers-analytic --help` stays fast; `data.py` and `registry.py` agree with it
(tests/test_layout.py checks the methods against `registry.DENOISERS`).
"""

BUILTIN_DATASETS = ("digits", "faces", "patches")
METHODS = ("els", "ls", "nearest_dataset", "optimal", "pca_locality", "scfdm", "wiener")
