"""cryomatch: align and score cryo-EM and cryo-ET images against references.

Three layers: ``kernels`` (pure array functions, numpy or cupy), ``io`` (files), and
``stages`` (read, compute in batches, write). The command line and the Snakemake rules
call the stages.
"""

__version__ = "0.1.0"
