// Label every core voxel of one shard of chunks by the seed region its trajectory ends in.
process ZSEG_MASKS {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_high'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest(s) of the stage before (a reduce's one file, or every shard of a map
    // stage: a barrier), so -resume re-runs this task when that stage did new work. The data
    // itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("masks.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-masks --run '${meta.run}' --session '${meta.session}' --shard ${index}/${count} --emit masks.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "masks", "shard": "${index}/${count}", "stub": true}' > masks.${index}.json
    """
}
