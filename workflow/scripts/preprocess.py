from superweights.data.preprocess import PreprocessSettings, preprocess
from superweights.data.qc_plot import plot_qc
from superweights.outputs import write_h5ad, write_tsv
from superweights.rule_io import rule_log

with rule_log(snakemake):
    out = snakemake.output
    tokenised, qc = preprocess(
        snakemake.input[0],
        PreprocessSettings(**snakemake.params.settings),
    )
    write_tsv(out.qc, qc)
    plot_qc(qc, out.figure)
    write_h5ad(tokenised, out.h5ad)
