from superweights.data.preprocess import PreprocessSettings, preprocess
from superweights.data.qc_plot import plot_qc
from superweights.outputs import write_h5ad, write_tsv
from superweights.rule_io import rule_log

with rule_log(snakemake):
    out = snakemake.output
    tokenised, qc = preprocess(
        snakemake.input.data,
        PreprocessSettings(**snakemake.params.settings),
        snakemake.input.vocab or None,  # the checkpoint's vocab.json, if one is configured
    )
    write_tsv(out.qc, qc)
    plot_qc(qc, out.figure)
    write_h5ad(tokenised, out.h5ad)
