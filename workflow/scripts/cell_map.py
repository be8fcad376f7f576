from superweights.cell_map import map_cells, read_cells, write_outputs
from superweights.cell_map_plots import write_cell_map_figure
from superweights.data.preprocess import read_tokenised
from superweights.rule_io import rule_log

with rule_log(snakemake):
    result = map_cells(
        read_cells(snakemake.input.cells),
        read_tokenised(snakemake.input.data),
        min_cells=snakemake.params.settings["min_cells"],
        seed=snakemake.params.settings["seed"],
        n_permutations=snakemake.params.settings["n_permutations"],
    )
    write_outputs(result, snakemake.output)
    write_cell_map_figure(result.cells, snakemake.output.figure)
