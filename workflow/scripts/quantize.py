from pathlib import Path

from superweights.quantize import QuantizeSettings, quantize_checkpoint, write_outputs
from superweights.quantize_plots import plot_quantization
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    inp, params, out = snakemake.input, snakemake.params, snakemake.output  # noqa: F821
    frame = quantize_checkpoint(
        inp.data,
        inp.checkpoint,
        inp.super_weights,
        QuantizeSettings(**params.settings),
        batch_size=params.batch_size,
        max_seq_len=params.max_seq_len,
        seed=params.seed,
    )
    write_outputs(frame, Path(out.table).parent)
    plot_quantization(frame, out.figure)
