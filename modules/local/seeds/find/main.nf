// Find the seeds (end-point histogram maxima) that the cores of one shard of chunks own.
process ZSEG_SEEDS_FIND {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest(s) of the stage before (a reduce's one file, or every shard of a map
    // stage: a barrier), so -resume re-runs this task when that stage did new work. The data
    // itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("seeds_find.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-seeds --run '${meta.run}' --session '${meta.session}' --stage find --shard ${index}/${count} --emit seeds_find.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "seeds:find", "shard": "${index}/${count}", "stub": true}' > seeds_find.${index}.json
    """
}
