from superweights.ablate import AblateSettings, confirm_checkpoint
from superweights.outputs import write_json, write_tsv
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp, out = snakemake.input, snakemake.output
    settings = AblateSettings(**snakemake.params.settings)
    result = confirm_checkpoint(
        inp.data, inp.checkpoint, inp.candidates, settings, score="masked-expression"
    )
    write_tsv(out.confirmed, result.to_frame())
    write_tsv(out.nulls, result.nulls)
    write_tsv(out.topk, result.topk)
    write_json(out.summary, {"score": "masked-expression log-likelihood per cell",
                             "warning": result.warning, "settings": result.settings})  # fmt: skip
