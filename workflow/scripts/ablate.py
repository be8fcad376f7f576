from superweights import ablate
from superweights.rule_io import rule_log

with rule_log(snakemake):
    ablate.run(
        snakemake.input,
        snakemake.output,
        ablate.AblateSettings(**snakemake.params.settings),
        score=snakemake.params.get("score"),  # confirm_base: the confirmation alone
        selection_splits=snakemake.params.probe_splits,
    )
