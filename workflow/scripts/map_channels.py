from pathlib import Path

from superweights.channels import ChannelSettings, map_channels, write_outputs
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    inp = snakemake.input  # noqa: F821
    result = map_channels(
        inp.data,
        inp.checkpoint,
        inp.candidates,
        ChannelSettings(**snakemake.params.settings),  # noqa: F821
    )
    write_outputs(result, Path(snakemake.output.genes).parent)  # noqa: F821
