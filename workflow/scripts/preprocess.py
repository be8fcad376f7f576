from superweights.data.preprocess import PreprocessSettings, preprocess
from superweights.data.qc_plot import plot_qc
from superweights.outputs import write_h5ad, write_tsv
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    out = snakemake.output  # noqa: F821
    tokenised, qc = preprocess(
        snakemake.input[0],  # noqa: F821
        PreprocessSettings(**snakemake.params.settings),  # noqa: F821
    )
    write_tsv(out.qc, qc)
    plot_qc(qc, out.figure)
    write_h5ad(tokenised, out.h5ad)
