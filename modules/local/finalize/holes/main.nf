// A 3D volume run: for the cells one shard of chunks owns, the cells their holes fill over
// (Cellpose fills holes over what they hold); the process exits at once for 2D runs.
process ZSEG_FINALIZE_HOLES {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest(s) of the stage before (a reduce's one file, or every shard of a map
    // stage: a barrier), so -resume re-runs this task when that stage did new work. The data
    // itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("finalize_holes.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-finalize --run '${meta.run}' --session '${meta.session}' --stage holes --shard ${index}/${count} --emit finalize_holes.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "finalize:holes", "shard": "${index}/${count}", "stub": true}' > finalize_holes.${index}.json
    """
}
