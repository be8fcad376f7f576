from superweights.channels import ChannelSettings, map_channels, write_outputs
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp = snakemake.input
    result = map_channels(
        inp.data,
        inp.checkpoint,
        inp.candidates,
        ChannelSettings(**snakemake.params.settings),
        nulls=inp.nulls,
    )
    write_outputs(result, snakemake.output)
