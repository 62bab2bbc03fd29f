"""metascreen: label-free screening of cancer cells for metastatic potential.

The science lives here as pure functions (arrays in, arrays out); reading and writing
files happens in :mod:`metascreen.io` and the per-well stage functions in
:mod:`metascreen.stages`, which the command line (:mod:`metascreen.cli`) and the
Snakemake rules call.
"""

__version__ = "0.1.0"
