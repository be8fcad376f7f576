from superweights import persistence
from superweights.ablate import AblateSettings
from superweights.rule_io import rule_log

with rule_log(snakemake):
    persistence.run(
        snakemake.input,
        snakemake.output,
        AblateSettings(**snakemake.params.settings),
    )
