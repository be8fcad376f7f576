from superweights.data.preprocess import PreprocessSettings, preprocess, write_h5ad_atomic
from superweights.data.qc_plot import plot_qc
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    out = snakemake.output  # noqa: F821
    tokenised, qc = preprocess(
        snakemake.input[0],  # noqa: F821
        PreprocessSettings(**snakemake.params.settings),  # noqa: F821
    )
    qc.to_csv(out.qc, sep="\t", index=False)
    plot_qc(qc, out.figure)
    write_h5ad_atomic(tokenised, out.h5ad)
