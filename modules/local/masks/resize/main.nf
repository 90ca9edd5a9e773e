// --no-resample runs: the network-scale masks of one shard of chunks resized back to the volume by
// nearest neighbour, as Cellpose resizes its masks (exits at once otherwise).
process ZSEG_MASKS_RESIZE {
    tag "${meta.id} shard ${index}/${count}"
    label 'process_medium'
    containerOptions "${meta.container_options}"

    input:
    // upstream: the manifest of the stage before (a barrier), so -resume re-runs this task when
    // that stage did new work. The data itself is read and written in place, at the URI meta.run.
    tuple val(meta), val(index), val(count), path(upstream, stageAs: 'upstream/*')

    output:
    tuple val(meta), path("masks_resize.${index}.json"), emit: manifest

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus} NUMBA_NUM_THREADS=${task.cpus}
    zseg-masks --run '${meta.run}' --session '${meta.session}' --stage resize --shard ${index}/${count} --emit masks_resize.${index}.json ${args}
    """

    stub:
    """
    echo '{"run": "${meta.run}", "stage": "masks:resize", "shard": "${index}/${count}", "stub": true}' > masks_resize.${index}.json
    """
}
