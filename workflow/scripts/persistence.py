from superweights.ablate import AblateSettings
from superweights.model.spikes import read_spikes
from superweights.model.spikes_plots import plot_spikes
from superweights.outputs import write_tsv
from superweights.persistence import persistence
from superweights.persistence_plots import write_figure
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp, out = snakemake.input, snakemake.output
    table = persistence(
        inp.data,
        inp.base,
        inp.finetuned,
        inp.base_confirmed,
        inp.finetuned_confirmed,
        AblateSettings(**snakemake.params.settings),
        base_candidates=inp.base_candidates,
        finetuned_candidates=inp.finetuned_candidates,
    )
    write_tsv(out.table, table)
    write_figure(table, out.figure)
    plot_spikes([read_spikes(path) for path in inp.spikes], out.spikes_figure)
