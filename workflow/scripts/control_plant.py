from superweights import control
from superweights.rule_io import rule_log
from superweights.settings import ControlSettings, GeneSetSettings

with rule_log(snakemake):
    finetune = snakemake.params.finetune
    control.run_plant(
        snakemake.input,
        snakemake.output,
        ControlSettings(
            **snakemake.params.settings,
            max_seq_len=finetune["max_seq_len"],
            batch_size=finetune["batch_size"],
        ),
        gene_sets=GeneSetSettings(**snakemake.params.gene_sets),
    )
