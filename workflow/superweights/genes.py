"""The Alzheimer's disease genes that every stage keeps, ranks and highlights by default.

APP and the presenilins PSEN1 and PSEN2 (amyloid; familial AD), MAPT (tau), and APOE and
TREM2 (the strongest late-onset risk genes). They form the `AD_CORE_GENES` set of the
shipped `gene_sets/alzheimers_curated.gmt`, whose README cites the discovery of each.
"""

GENES_OF_INTEREST = ("APP", "MAPT", "TREM2", "APOE", "PSEN1", "PSEN2")
