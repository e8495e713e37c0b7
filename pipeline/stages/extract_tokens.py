"""The ``extract_tokens`` stage (``pipeline.jobs.extract_tokens``): the token set of one
(dataset, split, encoder), one token store per chosen layer, or with
``runtime.extract_shards`` > 1 only its completion, after the shard jobs.

The layers come from the ``layers.json`` of every encoder pair the encoder is in, read when
the job runs: the union over the configured layer choices (and over the grid's runs when
layers are chosen per run) of this encoder's side, so a layer chosen twice is extracted
once, and every layer comes out of one forward pass over the split. The job's declared
output is the set's marker listing them; stores of layers no longer chosen are removed.

Fresh or resumed: while it works the job marks the set's folder (``core.RunMark``). A job
that finds the mark follows a killed one: finished layer stores with the expected
fingerprint are kept and unfinished ones resume block by block. A job that finds no mark was
asked to run again (forced, or its config slice or a ``layers.json`` changed) and extracts
every layer from scratch, as a forced pooled extraction does.
"""

import logging
from pathlib import Path

from pipeline import layout
from pipeline.extraction import Source, Tokens, extract, finish, job_layers, write_token_set
from pipeline.jobs import Job
from pipeline.stores.core import RunMark

log = logging.getLogger(__name__)


def run(job: Job) -> None:
    marker = Path(job.output("tokens"))
    target = Tokens().target(str(marker))
    if "shards" in job.inputs:
        paths = finish(Tokens(), target, job.input_list("shards"))
        write_token_set(marker, job.spec, paths)
        return
    layers = job_layers(job)
    with RunMark(layout.run_mark(str(target))) as fresh:
        log.info("%s layers %s", "extracting" if fresh else "resuming", layers)
        paths = extract(Tokens(job.spec["tokens"]), Source.of_job(job), target, layers, fresh=fresh)
        write_token_set(marker, job.spec, paths)
