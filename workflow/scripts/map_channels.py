from superweights import channels
from superweights.rule_io import rule_log

with rule_log(snakemake):
    channels.run(
        snakemake.input,
        snakemake.output,
        channels.ChannelSettings(**snakemake.params.settings),
    )
