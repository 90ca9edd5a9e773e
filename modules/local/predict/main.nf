// One predict unit (of the run's predict units, fixed by the volume and the network): normalise
// its input with the global percentiles, run Cellpose's network on the YX, ZY and ZX tiles it
// owns (each tile of the whole volume belongs to exactly one unit), write its partial sums to the
// work folder (units/). One GPU under -profile gpu. A run given precomputed --flows has nothing
// to predict: the task exits at once (leave out -profile gpu then, so that it does not wait for a GPU).
process ZSEG_PREDICT {
    tag "${meta.id} unit ${index}/${count}"
    label 'process_gpu'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest(s) of the stage before (a reduce's one file, or every shard of a map
    // stage: a barrier), so -resume re-runs this task when that stage did new work. The data
    // itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("predict.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus}
    zseg-predict --run '${meta.run}' --session '${meta.session}' --shard ${index}/${count} --emit predict.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "predict", "shard": "${index}/${count}", "stub": true}' > predict.${index}.json
    """
}
