// Intensity histograms of one shard of chunks (map of the global percentiles).
process ZSEG_PERCENTILES_MAP {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest(s) of the stage before (a reduce's one file, or every shard of a map
    // stage: a barrier), so -resume re-runs this task when that stage did new work. The data
    // itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("percentiles.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-percentiles --run '${meta.run}' --session '${meta.session}' --shard ${index}/${count} --emit percentiles.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "percentiles", "shard": "${index}/${count}", "stub": true}' > percentiles.${index}.json
    """
}
